//! `shopverse.delivery.v1.DeliveryService`: roles checked, then the use case, then the reply.

use tonic::{Request, Response, Status};

use shopverse_kit::ServiceError;
use shopverse_kit::clock::to_timestamp;
use shopverse_kit::identity::{Role, require};
use shopverse_proto::delivery::v1::delivery_service_server::DeliveryService;
use shopverse_proto::delivery::v1::*;

use crate::app::Delivery;
use crate::domain::ShipmentState;
use crate::store::ShipmentRow;

pub(crate) fn to_proto(s: &ShipmentRow) -> Shipment {
    Shipment {
        id: s.id.clone(),
        order_id: s.order_id.clone(),
        user_id: s.user_id.clone(),
        carrier: s.carrier.clone(),
        tracking_number: s.tracking_number.clone(),
        status: match s.status {
            ShipmentState::Scheduled => ShipmentStatus::Scheduled,
            ShipmentState::Shipped => ShipmentStatus::Shipped,
            ShipmentState::Delivered => ShipmentStatus::Delivered,
            ShipmentState::Cancelled => ShipmentStatus::Cancelled,
        }
        .into(),
        eta: Some(to_timestamp(s.eta)),
        created_at: Some(to_timestamp(s.created_at)),
        updated_at: Some(to_timestamp(s.updated_at)),
        country: s.country.clone(),
    }
}

fn reply(r: Result<ShipmentRow, ServiceError>) -> Result<Response<Shipment>, Status> {
    r.map(|s| Response::new(to_proto(&s))).map_err(Status::from)
}

#[tonic::async_trait]
impl DeliveryService for Delivery {
    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn get_shipment(
        &self,
        req: Request<GetShipmentRequest>,
    ) -> Result<Response<Shipment>, Status> {
        let caller = require(&req, Role::Customer)?;
        reply(self.shipment_for(&req.get_ref().order_id, &caller).await)
    }

    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn mark_shipped(
        &self,
        req: Request<MarkShipmentRequest>,
    ) -> Result<Response<Shipment>, Status> {
        require(&req, Role::Admin)?;
        reply(self.mark_shipped(&req.get_ref().order_id).await)
    }

    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn mark_delivered(
        &self,
        req: Request<MarkShipmentRequest>,
    ) -> Result<Response<Shipment>, Status> {
        require(&req, Role::Admin)?;
        reply(self.mark_delivered(&req.get_ref().order_id).await)
    }
}
