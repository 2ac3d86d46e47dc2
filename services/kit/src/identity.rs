//! Who is calling.
//!
//! The gateway verifies the caller's token, drops any identity metadata the client sent, and
//! forwards the verified subject and roles as `x-shopverse-user` and `x-shopverse-roles`
//! (comma-separated). Services trust that metadata because only the gateway and other services
//! reach their ports; a service port must never be exposed to clients directly.

use tonic::metadata::MetadataMap;

use crate::error::ServiceError;

pub const USER_HEADER: &str = "x-shopverse-user";
pub const ROLES_HEADER: &str = "x-shopverse-roles";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Customer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s.trim() {
            "customer" => Some(Role::Customer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub roles: Vec<Role>,
}

impl Identity {
    /// Admins may do whatever customers may.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || (role == Role::Customer && self.roles.contains(&Role::Admin))
    }

    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    /// Reads the identity from request metadata; `None` for an anonymous call.
    pub fn from_metadata(md: &MetadataMap) -> Option<Identity> {
        let user_id = md.get(USER_HEADER)?.to_str().ok()?.trim();
        if user_id.is_empty() {
            return None;
        }
        let roles = md
            .get(ROLES_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(',').filter_map(Role::parse).collect())
            .unwrap_or_default();
        Some(Identity {
            user_id: user_id.to_owned(),
            roles,
        })
    }

    /// Writes this identity into outgoing metadata (service-to-service calls, tests).
    pub fn write_to(&self, md: &mut MetadataMap) {
        if let Ok(v) = self.user_id.parse() {
            md.insert(USER_HEADER, v);
        }
        let roles: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        if let Ok(v) = roles.join(",").parse() {
            md.insert(ROLES_HEADER, v);
        }
    }
}

/// A request carrying `user_id` and `roles` as the gateway would forward them (for calls made
/// on a user's behalf from inside: the CLI's demo orders, tests).
pub fn request_as<T>(msg: T, user_id: &str, roles: &[Role]) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    Identity {
        user_id: user_id.to_owned(),
        roles: roles.to_vec(),
    }
    .write_to(req.metadata_mut());
    req
}

/// The one role check: `UNAUTHENTICATED` without an identity, `PERMISSION_DENIED` without the role.
pub fn require<T>(req: &tonic::Request<T>, role: Role) -> Result<Identity, ServiceError> {
    let id = Identity::from_metadata(req.metadata()).ok_or(ServiceError::Unauthenticated(
        "this call needs a signed-in user".into(),
    ))?;
    if !id.has(role) {
        return Err(ServiceError::PermissionDenied(format!(
            "this call needs the `{}` role",
            role.as_str()
        )));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_anonymous() {
        let mut req = tonic::Request::new(());
        assert!(matches!(
            require(&req, Role::Customer),
            Err(ServiceError::Unauthenticated(_))
        ));
        Identity {
            user_id: "u1".into(),
            roles: vec![Role::Customer],
        }
        .write_to(req.metadata_mut());
        assert_eq!(
            require(&req, Role::Customer).map(|i| i.user_id).ok(),
            Some("u1".into())
        );
        assert!(matches!(
            require(&req, Role::Admin),
            Err(ServiceError::PermissionDenied(_))
        ));

        let mut admin = tonic::Request::new(());
        admin
            .metadata_mut()
            .insert(USER_HEADER, "a".parse().expect("ascii"));
        admin
            .metadata_mut()
            .insert(ROLES_HEADER, "admin, bogus".parse().expect("ascii"));
        let id = require(&admin, Role::Customer).expect("admin is a customer too");
        assert_eq!(id.roles, vec![Role::Admin]);
    }
}
