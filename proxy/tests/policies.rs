//! Every shipped policy in `policies/` loads, and does what its cases file says it does.
//!
//! A cases file `policies/tests/<name>.cases` holds one case per line: `allow` or `deny`, then the arguments of
//! `etcd-guard policy check` (without `--policy`), split on whitespace; `#` starts a comment line. Keys with spaces
//! use `\x20`, which `--key` and `--range-end` understand.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Policies that may go without a cases file of their own.
const CASES_OPTIONAL: &[&str] = &["kubernetes"];

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("policies")
}

fn guard(args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_etcd-guard")).args(args).output()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Files in `dir` whose name ends with `.ext`, sorted, as (stem, path).
fn files_with_ext(dir: &Path, ext: &str) -> Result<Vec<(String, PathBuf)>, Box<dyn std::error::Error>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == ext) {
            let stem =
                path.file_stem().and_then(|s| s.to_str()).ok_or_else(|| format!("{}: bad name", path.display()))?;
            found.push((stem.to_string(), path.clone()));
        }
    }
    found.sort();
    Ok(found)
}

/// Whether a case expects the request to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allow,
    Deny,
}

#[derive(Debug)]
struct Case {
    line: usize,
    expect: Expect,
    args: Vec<String>,
}

fn parse_cases(path: &Path) -> Result<Vec<Case>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cases = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let expect = match words.next() {
            Some("allow") => Expect::Allow,
            Some("deny") => Expect::Deny,
            other => {
                return Err(format!("{}:{}: a case starts with allow or deny, not {other:?}", path.display(), i + 1));
            }
        };
        let args: Vec<String> = words.map(str::to_string).collect();
        if args.iter().any(|a| a == "--policy" || a.starts_with("--policy=")) {
            return Err(format!("{}:{}: --policy is added by the test; leave it out", path.display(), i + 1));
        }
        if !args.iter().any(|a| a == "--rpc" || a.starts_with("--rpc=")) {
            return Err(format!("{}:{}: a case needs --rpc", path.display(), i + 1));
        }
        cases.push(Case { line: i + 1, expect, args });
    }
    Ok(cases)
}

#[test]
fn every_shipped_policy_validates() -> TestResult {
    let policies = files_with_ext(&policies_dir(), "yaml")?;
    assert!(policies.len() >= 7, "expected the shipped policies in {}, found {policies:?}", policies_dir().display());
    for (_, path) in &policies {
        let p = path.to_string_lossy();
        let o = guard(&["policy", "validate", &p])?;
        assert_eq!(o.status.code(), Some(0), "policy validate {p}:\n{}", text(&o));
    }
    Ok(())
}

#[test]
fn every_shipped_policy_has_cases_and_every_cases_file_a_policy() -> TestResult {
    let policies = files_with_ext(&policies_dir(), "yaml")?;
    let cases = files_with_ext(&policies_dir().join("tests"), "cases")?;
    for (name, path) in &policies {
        let has_cases = cases.iter().any(|(c, _)| c == name);
        assert!(
            has_cases || CASES_OPTIONAL.contains(&name.as_str()),
            "{} has no intent checks: add policies/tests/{name}.cases",
            path.display()
        );
    }
    for (name, path) in &cases {
        assert!(
            policies.iter().any(|(p, _)| p == name),
            "{} has no policy: expected policies/{name}.yaml",
            path.display()
        );
    }
    Ok(())
}

#[test]
fn every_case_decides_as_documented() -> TestResult {
    let dir = policies_dir();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, cases_path) in files_with_ext(&dir.join("tests"), "cases")? {
        let policy = dir.join(format!("{name}.yaml"));
        let policy = policy.to_string_lossy();
        let cases = parse_cases(&cases_path)?;
        let allows = cases.iter().filter(|c| c.expect == Expect::Allow).count();
        assert!(
            allows > 0 && allows < cases.len(),
            "{}: a cases file needs both allow and deny cases",
            cases_path.display()
        );
        for case in cases {
            let mut args = vec!["policy", "check", "--policy", &policy];
            args.extend(case.args.iter().map(String::as_str));
            let o = guard(&args)?;
            let want = match case.expect {
                Expect::Allow => 0,
                Expect::Deny => 1,
            };
            checked += 1;
            if o.status.code() != Some(want) {
                failures.push(format!(
                    "{}:{}: expected {:?} (exit {want}), got exit {:?}\n  etcd-guard {}\n{}",
                    cases_path.display(),
                    case.line,
                    case.expect,
                    o.status.code(),
                    args.join(" "),
                    text(&o).lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"),
                ));
            }
        }
    }
    assert!(checked > 0, "no cases found in {}", dir.join("tests").display());
    assert!(failures.is_empty(), "{} of {checked} cases failed:\n\n{}", failures.len(), failures.join("\n\n"));
    Ok(())
}

#[test]
fn a_malformed_case_line_is_reported_with_its_line() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("x.cases");
    std::fs::write(&path, "# comment\n\nallow --rpc status\npermit --rpc status\n")?;
    let err = parse_cases(&path).err().unwrap_or_default();
    assert!(err.contains("x.cases:4:"), "{err}");
    std::fs::write(&path, "deny --policy other.yaml --rpc status\n")?;
    let err = parse_cases(&path).err().unwrap_or_default();
    assert!(err.contains("--policy"), "{err}");
    Ok(())
}
