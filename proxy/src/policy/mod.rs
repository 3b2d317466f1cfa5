//! The access-control policy: which client identity may touch which etcd keys
//! and cluster APIs.
//!
//! * [`range`]: byte-exact key ranges and merged range sets.
//! * [`model`]: the YAML policy file, its parsing and validation.
//! * [`eval`]: the compiled [`Policy`], per-connection [`Permissions`] and
//!   per-request checks, plus [`Explanation`]s for humans.

pub mod eval;
pub mod model;
pub mod range;

pub use eval::{Access, Denied, Explanation, Grants, Mode, Permissions, Policy};
pub use model::{
    Binding, BindingMode, Capability, CapabilitySet, KeyAccess, KeyRule, KeyRuleKind, Limits, Pattern, PolicyDocument,
    PolicyError, Role, Selector, SelectorField, SourceLocation, UnknownCapability, ValidationError,
};
pub use range::{End, KeyRange, RangeError, RangeSet, escape_key, prefix_end, unescape_key};
