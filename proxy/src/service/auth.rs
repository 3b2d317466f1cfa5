//! `etcdserverpb.Auth`: etcd's own user and role store. Every RPC needs the `auth` capability: with auth
//! disabled upstream, anyone reaching etcd could otherwise `AuthEnable` and lock everybody out.

use etcd_guard_proto::etcdserverpb as pb;

use super::{Answer, Guard, HttpRequest};
use crate::authz::{self, capability};
use crate::policy::Capability;

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    Some(match method {
        "AuthEnable" => {
            g.unary::<pb::AuthEnableRequest, _>(req, "/etcdserverpb.Auth/AuthEnable", capability(Capability::Auth))
                .await
        }
        "AuthDisable" => {
            g.unary::<pb::AuthDisableRequest, _>(req, "/etcdserverpb.Auth/AuthDisable", capability(Capability::Auth))
                .await
        }
        "AuthStatus" => {
            g.unary::<pb::AuthStatusRequest, _>(req, "/etcdserverpb.Auth/AuthStatus", capability(Capability::Auth))
                .await
        }
        "Authenticate" => {
            g.unary::<pb::AuthenticateRequest, _>(req, "/etcdserverpb.Auth/Authenticate", capability(Capability::Auth))
                .await
        }
        "UserAdd" => {
            g.unary::<pb::AuthUserAddRequest, _>(req, "/etcdserverpb.Auth/UserAdd", capability(Capability::Auth)).await
        }
        "UserGet" => {
            g.unary::<pb::AuthUserGetRequest, _>(req, "/etcdserverpb.Auth/UserGet", capability(Capability::Auth)).await
        }
        "UserList" => {
            g.unary::<pb::AuthUserListRequest, _>(req, "/etcdserverpb.Auth/UserList", capability(Capability::Auth))
                .await
        }
        "UserDelete" => {
            g.unary::<pb::AuthUserDeleteRequest, _>(req, "/etcdserverpb.Auth/UserDelete", capability(Capability::Auth))
                .await
        }
        "UserChangePassword" => {
            g.unary::<pb::AuthUserChangePasswordRequest, _>(
                req,
                "/etcdserverpb.Auth/UserChangePassword",
                capability(Capability::Auth),
            )
            .await
        }
        "UserGrantRole" => {
            g.unary::<pb::AuthUserGrantRoleRequest, _>(
                req,
                "/etcdserverpb.Auth/UserGrantRole",
                capability(Capability::Auth),
            )
            .await
        }
        "UserRevokeRole" => {
            g.unary::<pb::AuthUserRevokeRoleRequest, _>(
                req,
                "/etcdserverpb.Auth/UserRevokeRole",
                capability(Capability::Auth),
            )
            .await
        }
        "RoleAdd" => {
            g.unary::<pb::AuthRoleAddRequest, _>(req, "/etcdserverpb.Auth/RoleAdd", capability(Capability::Auth)).await
        }
        "RoleGet" => {
            g.unary::<pb::AuthRoleGetRequest, _>(req, "/etcdserverpb.Auth/RoleGet", capability(Capability::Auth)).await
        }
        "RoleList" => {
            g.unary::<pb::AuthRoleListRequest, _>(req, "/etcdserverpb.Auth/RoleList", capability(Capability::Auth))
                .await
        }
        "RoleDelete" => {
            g.unary::<pb::AuthRoleDeleteRequest, _>(req, "/etcdserverpb.Auth/RoleDelete", capability(Capability::Auth))
                .await
        }
        "RoleGrantPermission" => {
            g.unary::<pb::AuthRoleGrantPermissionRequest, _>(
                req,
                "/etcdserverpb.Auth/RoleGrantPermission",
                authz::role_grant_permission,
            )
            .await
        }
        "RoleRevokePermission" => {
            g.unary::<pb::AuthRoleRevokePermissionRequest, _>(
                req,
                "/etcdserverpb.Auth/RoleRevokePermission",
                capability(Capability::Auth),
            )
            .await
        }
        _ => return None,
    })
}
