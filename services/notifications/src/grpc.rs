//! `shopverse.notifications.v1.NotificationsService`: roles checked, then the use case.

use tonic::{Request, Response, Status};

use shopverse_kit::identity::{Role, require};
use shopverse_proto::notifications::v1::notifications_service_server::NotificationsService;
use shopverse_proto::notifications::v1::*;

use crate::app::Notifications;

#[tonic::async_trait]
impl NotificationsService for Notifications {
    async fn list_my_notifications(
        &self,
        req: Request<ListMyNotificationsRequest>,
    ) -> Result<Response<ListMyNotificationsResponse>, Status> {
        let caller = require(&req, Role::Customer)?;
        let r = req.get_ref();
        let (notifications, next_page_token) = self
            .inbox(&caller.user_id, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(ListMyNotificationsResponse {
            notifications,
            next_page_token,
        }))
    }
}
