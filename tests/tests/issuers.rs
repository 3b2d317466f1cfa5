//! `tls.issuers` and `issuer:` in bindings: with a client CA bundle of etcd's CA and a CA for components, a
//! component certificate that takes kube-apiserver's (here: admin's) common name gets nothing.

use etcd_guard::certs::{DevCa, LeafKind};
use etcd_guard::config::Config;
use etcd_guard::server::Proxy;
use etcd_guard_tests::{ClientCert, Etcd, Pki, TestResult, watch_matrix};
use serde_json::Value;

const POLICY: &str = r#"
roles:
  - name: admin
    keys: [ { prefix: "", access: readwrite } ]
    cluster: [admin]
  - name: cilium
    keys: [ { prefix: "cilium/", access: readwrite } ]
bindings:
  - role: admin
    subjects: [ { common_name: "admin", issuer: etcd } ]
  - role: cilium
    subjects: [ { common_name: "cilium-agent", issuer: components } ]
"#;

fn config(pki: &Pki, etcd: &Etcd, issuers: &str) -> String {
    format!(
        r#"listen: "127.0.0.1:0"
tls: {{ cert_file: server.crt, key_file: server.key, client_ca_file: bundle.crt, issuers: {issuers} }}
upstream: {{ endpoints: ["{}"], ca_file: ca.crt, cert_file: upstream-client.crt, key_file: upstream-client.key }}
policy_file: policy.yaml
metrics_listen: "off"
audit: {{ file: {} }}
{}"#,
        etcd.client_url,
        pki.path("audit/audit.log").display(),
        watch_matrix("")
    )
}

async fn client(pki: &Pki, addr: std::net::SocketAddr, who: &ClientCert) -> TestResult<etcd_client::Client> {
    let opts = etcd_client::ConnectOptions::new().with_tls(pki.client_tls(who)?);
    Ok(etcd_client::Client::connect([format!("https://{addr}")], Some(opts)).await?)
}

fn denied(r: Result<impl Sized, etcd_client::Error>) -> bool {
    matches!(r, Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::PermissionDenied
        && s.message() == "etcdserver: permission denied")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binding_with_an_issuer_takes_only_certificates_of_that_ca() -> TestResult {
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    let components = DevCa::new("components CA")?;
    std::fs::write(pki.path("components-ca.crt"), components.cert_pem())?;
    std::fs::write(
        pki.path("bundle.crt"),
        format!("{}{}", std::fs::read_to_string(pki.ca_file())?, components.cert_pem()),
    )?;
    std::fs::write(pki.path("policy.yaml"), POLICY)?;
    std::fs::write(
        pki.path("etcd-guard.yaml"),
        config(&pki, &etcd, "{ etcd: ca.crt, components: components-ca.crt }"),
    )?;
    let proxy = Proxy::bind(&Config::load(&pki.path("etcd-guard.yaml"))?).await?.spawn();
    let addr = proxy.local_addr;

    let admin = pki.client("admin", "admin", None, &[])?;
    let mut c = client(&pki, addr, &admin).await?;
    c.put("cilium/x", "v", None).await?;
    c.put("/registry/secrets/a", "s", None).await?;

    // The components CA is trusted (in the bundle), and may issue any common name: not admin's grants.
    let forged = components.issue(LeafKind::Client, "admin", None, &[], &[])?;
    let forged = pki.write_pair("forged", &forged.cert_pem, &forged.key_pem)?;
    let mut f = client(&pki, addr, &forged).await?;
    assert!(denied(f.get("/registry/secrets/a", None).await), "a components-CA certificate got admin's grants");

    let agent = components.issue(LeafKind::Client, "cilium-agent", None, &[], &[])?;
    let agent = pki.write_pair("agent", &agent.cert_pem, &agent.key_pem)?;
    let mut a = client(&pki, addr, &agent).await?;
    assert_eq!(a.get("cilium/x", None).await?.kvs().len(), 1);
    // And one of etcd's CA with the agent's name is not the agent.
    let mut wrong = client(&pki, addr, &pki.client("agent2", "cilium-agent", None, &[])?).await?;
    assert!(denied(wrong.get("cilium/x", None).await));

    proxy.stop().await;
    let text = std::fs::read_to_string(pki.path("audit/audit.log"))?;
    let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let forged_record = records
        .iter()
        .find(|r| r["decision"] == "deny" && r["identity"]["common_name"] == "admin")
        .ok_or("no record of the forged admin's denial")?;
    assert_eq!(forged_record["identity"]["issuers"], serde_json::json!(["components"]), "{forged_record}");
    let admin_record = records
        .iter()
        .find(|r| r["decision"] == "allow" && r["identity"]["common_name"] == "admin")
        .ok_or("no record of admin")?;
    assert_eq!(admin_record["identity"]["issuers"], serde_json::json!(["etcd"]), "{admin_record}");
    Ok(())
}

/// A name cannot widen what is trusted: every CA of an issuer must be in the client CA bundle.
#[tokio::test(flavor = "multi_thread")]
async fn an_issuer_outside_the_client_ca_bundle_is_refused() -> TestResult {
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    std::fs::write(pki.path("other-ca.crt"), DevCa::new("other CA")?.cert_pem())?;
    std::fs::copy(pki.ca_file(), pki.path("bundle.crt"))?;
    std::fs::write(pki.path("policy.yaml"), POLICY)?;
    std::fs::write(pki.path("etcd-guard.yaml"), config(&pki, &etcd, "{ etcd: ca.crt, components: other-ca.crt }"))?;
    let err = Proxy::bind(&Config::load(&pki.path("etcd-guard.yaml"))?).await.err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(err.contains("other-ca.crt") && err.contains("not in tls.client_ca_file"), "{err}");
    // A server certificate named as an issuer (a common slip) is called what it is.
    std::fs::write(pki.path("etcd-guard.yaml"), config(&pki, &etcd, "{ etcd: ca.crt, components: server.crt }"))?;
    let err = Proxy::bind(&Config::load(&pki.path("etcd-guard.yaml"))?).await.err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(err.contains("server.crt") && err.contains("not a CA certificate"), "{err}");
    // A policy that requires an issuer the configuration does not name is a mistake, not a way to deny: refused at
    // start (and on reload, where the previous policy stays).
    std::fs::write(pki.path("etcd-guard.yaml"), config(&pki, &etcd, "{ etcd: ca.crt }"))?;
    let err = Proxy::bind(&Config::load(&pki.path("etcd-guard.yaml"))?).await.err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(err.contains(r#"["components"]"#) && err.contains("does not name"), "{err}");
    Ok(())
}

/// A reload that changes which CAs a name covers ends the open connections whose issuers it changed (their
/// permissions were found with the old ones): fixing a wrong `etcd:` entry takes effect on open connections too.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_changes_a_connections_issuers_ends_it() -> TestResult {
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    let components = DevCa::new("components CA")?;
    let both = format!("{}{}", std::fs::read_to_string(pki.ca_file())?, components.cert_pem());
    std::fs::write(pki.path("bundle.crt"), &both)?;
    // The mistake: `etcd` names the whole bundle.
    std::fs::write(pki.path("etcd-issuer.crt"), &both)?;
    std::fs::write(pki.path("policy.yaml"), POLICY)?;
    std::fs::write(pki.path("components-ca.crt"), components.cert_pem())?;
    let issuers = "{ etcd: etcd-issuer.crt, components: components-ca.crt }";
    std::fs::write(pki.path("etcd-guard.yaml"), config(&pki, &etcd, issuers))?;
    let proxy = Proxy::bind(&Config::load(&pki.path("etcd-guard.yaml"))?).await?.spawn();
    let addr = proxy.local_addr;
    let admin = pki.client("admin", "admin", None, &[])?;
    let mut real = client(&pki, addr, &admin).await?;
    real.put("/registry/secrets/a", "s", None).await?;
    let forged = components.issue(LeafKind::Client, "admin", None, &[], &[])?;
    let forged = pki.write_pair("forged", &forged.cert_pem, &forged.key_pem)?;
    let mut f = client(&pki, addr, &forged).await?;
    f.get("/registry/secrets/a", None).await?;

    // The fix: only etcd's CA is `etcd`.
    std::fs::copy(pki.ca_file(), pki.path("etcd-issuer.crt"))?;
    proxy.reload.trigger();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match f.get("/registry/secrets/a", None).await {
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Ok(_) => return Err("the forged admin's open connection kept admin's grants".into()),
            // Its connection ends; a new one is denied.
            Err(_) => break,
        }
    }
    let mut again = client(&pki, addr, &forged).await?;
    assert!(denied(again.get("/registry/secrets/a", None).await));
    // The real admin's issuers did not change: its connection is left alone and still served.
    real.get("/registry/secrets/a", None).await?;
    proxy.stop().await;
    Ok(())
}
