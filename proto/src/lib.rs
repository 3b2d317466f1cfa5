//! etcd's v3 gRPC API, compiled for client and server from the `.proto` files in `proto/`.
//!
//! The files are the superset of etcd 3.4 to 3.7 (every RPC and field up to 3.7) so that no request field is lost
//! when the proxy decodes and re-encodes a request. Package, message and field names and numbers are etcd's.
//!
//! Module layout follows the protobuf packages: [`etcdserverpb`] (services `KV`, `Watch`, `Lease`, `Cluster`,
//! `Maintenance`, `Auth`), [`mvccpb`], [`authpb`], [`v3lockpb`] (service `Lock`), [`v3electionpb`] (service
//! `Election`) and [`grpc::health::v1`] (re-exported as [`grpc_health_v1`]). Each service `Foo` has a client in
//! `foo_client::FooClient` and a server in `foo_server::{Foo, FooServer}`. [`methods`] lists every full RPC path.

#![forbid(unsafe_code)]

/// etcd's `mvccpb` package: `KeyValue` and `Event`.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd's `authpb` package: `User`, `Role`, `Permission`, `UserAddOptions`.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// etcd's `etcdserverpb` package: the `KV`, `Watch`, `Lease`, `Cluster`, `Maintenance` and `Auth` services.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");

    pub use crate::last_wins::{RequestOp, WatchRequest, request_op, watch_request};
}

mod last_wins;

/// etcd's `v3lockpb` package: the `Lock` service.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

/// etcd's `v3electionpb` package: the `Election` service.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

/// The `grpc.*` packages.
pub mod grpc {
    /// The `grpc.health.*` packages.
    pub mod health {
        /// The standard gRPC health checking protocol (`grpc.health.v1`), which etcd serves.
        #[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}

pub use grpc::health::v1 as grpc_health_v1;

/// The full gRPC path (`/package.Service/Method`, as sent in the HTTP/2 `:path`) of every RPC in the `.proto`
/// files. The names are case-sensitive and exactly etcd's (e.g. `HashKV`, `MemberList`).
pub mod methods {
    // etcdserverpb.KV
    pub const KV_RANGE: &str = "/etcdserverpb.KV/Range";
    pub const KV_RANGE_STREAM: &str = "/etcdserverpb.KV/RangeStream";
    pub const KV_PUT: &str = "/etcdserverpb.KV/Put";
    pub const KV_DELETE_RANGE: &str = "/etcdserverpb.KV/DeleteRange";
    pub const KV_TXN: &str = "/etcdserverpb.KV/Txn";
    pub const KV_COMPACT: &str = "/etcdserverpb.KV/Compact";

    // etcdserverpb.Watch
    pub const WATCH_WATCH: &str = "/etcdserverpb.Watch/Watch";

    // etcdserverpb.Lease
    pub const LEASE_GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
    pub const LEASE_REVOKE: &str = "/etcdserverpb.Lease/LeaseRevoke";
    pub const LEASE_KEEP_ALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
    pub const LEASE_TIME_TO_LIVE: &str = "/etcdserverpb.Lease/LeaseTimeToLive";
    pub const LEASE_LEASES: &str = "/etcdserverpb.Lease/LeaseLeases";

    // etcdserverpb.Cluster
    pub const CLUSTER_MEMBER_ADD: &str = "/etcdserverpb.Cluster/MemberAdd";
    pub const CLUSTER_MEMBER_REMOVE: &str = "/etcdserverpb.Cluster/MemberRemove";
    pub const CLUSTER_MEMBER_UPDATE: &str = "/etcdserverpb.Cluster/MemberUpdate";
    pub const CLUSTER_MEMBER_LIST: &str = "/etcdserverpb.Cluster/MemberList";
    pub const CLUSTER_MEMBER_PROMOTE: &str = "/etcdserverpb.Cluster/MemberPromote";

    // etcdserverpb.Maintenance
    pub const MAINTENANCE_ALARM: &str = "/etcdserverpb.Maintenance/Alarm";
    pub const MAINTENANCE_STATUS: &str = "/etcdserverpb.Maintenance/Status";
    pub const MAINTENANCE_DEFRAGMENT: &str = "/etcdserverpb.Maintenance/Defragment";
    pub const MAINTENANCE_HASH: &str = "/etcdserverpb.Maintenance/Hash";
    pub const MAINTENANCE_HASH_KV: &str = "/etcdserverpb.Maintenance/HashKV";
    pub const MAINTENANCE_SNAPSHOT: &str = "/etcdserverpb.Maintenance/Snapshot";
    pub const MAINTENANCE_MOVE_LEADER: &str = "/etcdserverpb.Maintenance/MoveLeader";
    pub const MAINTENANCE_DOWNGRADE: &str = "/etcdserverpb.Maintenance/Downgrade";

    // etcdserverpb.Auth
    pub const AUTH_AUTH_ENABLE: &str = "/etcdserverpb.Auth/AuthEnable";
    pub const AUTH_AUTH_DISABLE: &str = "/etcdserverpb.Auth/AuthDisable";
    pub const AUTH_AUTH_STATUS: &str = "/etcdserverpb.Auth/AuthStatus";
    pub const AUTH_AUTHENTICATE: &str = "/etcdserverpb.Auth/Authenticate";
    pub const AUTH_USER_ADD: &str = "/etcdserverpb.Auth/UserAdd";
    pub const AUTH_USER_GET: &str = "/etcdserverpb.Auth/UserGet";
    pub const AUTH_USER_LIST: &str = "/etcdserverpb.Auth/UserList";
    pub const AUTH_USER_DELETE: &str = "/etcdserverpb.Auth/UserDelete";
    pub const AUTH_USER_CHANGE_PASSWORD: &str = "/etcdserverpb.Auth/UserChangePassword";
    pub const AUTH_USER_GRANT_ROLE: &str = "/etcdserverpb.Auth/UserGrantRole";
    pub const AUTH_USER_REVOKE_ROLE: &str = "/etcdserverpb.Auth/UserRevokeRole";
    pub const AUTH_ROLE_ADD: &str = "/etcdserverpb.Auth/RoleAdd";
    pub const AUTH_ROLE_GET: &str = "/etcdserverpb.Auth/RoleGet";
    pub const AUTH_ROLE_LIST: &str = "/etcdserverpb.Auth/RoleList";
    pub const AUTH_ROLE_DELETE: &str = "/etcdserverpb.Auth/RoleDelete";
    pub const AUTH_ROLE_GRANT_PERMISSION: &str = "/etcdserverpb.Auth/RoleGrantPermission";
    pub const AUTH_ROLE_REVOKE_PERMISSION: &str = "/etcdserverpb.Auth/RoleRevokePermission";

    // v3lockpb.Lock
    pub const LOCK_LOCK: &str = "/v3lockpb.Lock/Lock";
    pub const LOCK_UNLOCK: &str = "/v3lockpb.Lock/Unlock";

    // v3electionpb.Election
    pub const ELECTION_CAMPAIGN: &str = "/v3electionpb.Election/Campaign";
    pub const ELECTION_PROCLAIM: &str = "/v3electionpb.Election/Proclaim";
    pub const ELECTION_LEADER: &str = "/v3electionpb.Election/Leader";
    pub const ELECTION_OBSERVE: &str = "/v3electionpb.Election/Observe";
    pub const ELECTION_RESIGN: &str = "/v3electionpb.Election/Resign";

    // grpc.health.v1.Health
    pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
    pub const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

    /// Every path above.
    pub const ALL: &[&str] = &[
        KV_RANGE,
        KV_RANGE_STREAM,
        KV_PUT,
        KV_DELETE_RANGE,
        KV_TXN,
        KV_COMPACT,
        WATCH_WATCH,
        LEASE_GRANT,
        LEASE_REVOKE,
        LEASE_KEEP_ALIVE,
        LEASE_TIME_TO_LIVE,
        LEASE_LEASES,
        CLUSTER_MEMBER_ADD,
        CLUSTER_MEMBER_REMOVE,
        CLUSTER_MEMBER_UPDATE,
        CLUSTER_MEMBER_LIST,
        CLUSTER_MEMBER_PROMOTE,
        MAINTENANCE_ALARM,
        MAINTENANCE_STATUS,
        MAINTENANCE_DEFRAGMENT,
        MAINTENANCE_HASH,
        MAINTENANCE_HASH_KV,
        MAINTENANCE_SNAPSHOT,
        MAINTENANCE_MOVE_LEADER,
        MAINTENANCE_DOWNGRADE,
        AUTH_AUTH_ENABLE,
        AUTH_AUTH_DISABLE,
        AUTH_AUTH_STATUS,
        AUTH_AUTHENTICATE,
        AUTH_USER_ADD,
        AUTH_USER_GET,
        AUTH_USER_LIST,
        AUTH_USER_DELETE,
        AUTH_USER_CHANGE_PASSWORD,
        AUTH_USER_GRANT_ROLE,
        AUTH_USER_REVOKE_ROLE,
        AUTH_ROLE_ADD,
        AUTH_ROLE_GET,
        AUTH_ROLE_LIST,
        AUTH_ROLE_DELETE,
        AUTH_ROLE_GRANT_PERMISSION,
        AUTH_ROLE_REVOKE_PERMISSION,
        LOCK_LOCK,
        LOCK_UNLOCK,
        ELECTION_CAMPAIGN,
        ELECTION_PROCLAIM,
        ELECTION_LEADER,
        ELECTION_OBSERVE,
        ELECTION_RESIGN,
        HEALTH_CHECK,
        HEALTH_WATCH,
    ];
}
