//! The tonic service: roles checked, the use case in [`crate::app`] called, the reply mapped.

use shopverse_kit::ServiceError;
use shopverse_kit::identity::{Role, require};
use shopverse_proto::users::v1::users_service_server::UsersService;
use shopverse_proto::users::v1::*;
use tonic::{Request, Response, Status};

use crate::app::*;

fn reply<T>(r: Result<T, ServiceError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl UsersService for Users {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let tp = traceparent(&req);
        let r = req.into_inner();
        reply(
            self.create_user(
                &r.email,
                &r.password,
                &r.display_name,
                &[Role::Customer],
                tp.as_deref(),
            )
            .await
            .map(|u| RegisterResponse {
                user: Some(user_to_proto(&u)),
            }),
        )
    }

    async fn login(&self, req: Request<LoginRequest>) -> Result<Response<TokenPair>, Status> {
        reply(self.login(req.into_inner()).await)
    }

    async fn refresh(&self, req: Request<RefreshRequest>) -> Result<Response<TokenPair>, Status> {
        reply(self.refresh(req.into_inner()).await)
    }

    async fn logout(
        &self,
        req: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        reply(self.logout(req.into_inner()).await)
    }

    async fn get_me(&self, req: Request<GetMeRequest>) -> Result<Response<User>, Status> {
        let id = require(&req, Role::Customer)?;
        reply(self.me(&id.user_id).await.map(|u| user_to_proto(&u)))
    }

    async fn update_me(&self, req: Request<UpdateMeRequest>) -> Result<Response<User>, Status> {
        let id = require(&req, Role::Customer)?;
        reply(
            self.update_me(&id.user_id, req.into_inner())
                .await
                .map(|u| user_to_proto(&u)),
        )
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        require(&req, Role::Admin)?;
        reply(self.list_users(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(user_id = %req.get_ref().user_id))]
    async fn set_roles(&self, req: Request<SetRolesRequest>) -> Result<Response<User>, Status> {
        let id = require(&req, Role::Admin)?;
        reply(
            self.set_roles(&id.user_id, req.into_inner())
                .await
                .map(|u| user_to_proto(&u)),
        )
    }

    async fn get_jwks(&self, _req: Request<GetJwksRequest>) -> Result<Response<Jwks>, Status> {
        let keys = self
            .published_keys()
            .into_iter()
            .map(|k| Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: k.x,
                kid: k.kid,
                alg: "EdDSA".into(),
                r#use: "sig".into(),
            })
            .collect();
        Ok(Response::new(Jwks { keys }))
    }
}
