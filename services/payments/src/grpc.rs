//! `shopverse.payments.v1.PaymentsService`: read a payment, roles checked.

use shopverse_kit::ServiceError;
use shopverse_kit::identity::{Role, require};
use shopverse_proto::payments::v1::payments_service_server::PaymentsService;
use shopverse_proto::payments::v1::*;
use tonic::{Request, Response, Status};

use crate::app::Payments;

#[tonic::async_trait]
impl PaymentsService for Payments {
    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn get_payment(
        &self,
        req: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        let caller = require(&req, Role::Customer)?;
        let order_id = &req.get_ref().order_id;
        if order_id.is_empty() {
            return Err(ServiceError::invalid("order_id", "is required").into());
        }
        match self.get(order_id).await? {
            Some(p) if p.user_id == caller.user_id || caller.is_admin() => Ok(Response::new(p)),
            _ => Err(ServiceError::not_found("payment for order", order_id).into()),
        }
    }
}
