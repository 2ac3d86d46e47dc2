//! The tonic service: roles checked, the use case in [`crate::app`] called, the reply mapped.

use crate::domain::OrderState;
use shopverse_kit::ServiceError;
use shopverse_kit::identity::{Role, require};
use shopverse_proto::orders::v1::orders_service_server::OrdersService;
use shopverse_proto::orders::v1::*;
use tonic::{Request, Response, Status};

use crate::app::*;

fn reply<T>(r: Result<T, ServiceError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

fn traceparent<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tonic::async_trait]
impl OrdersService for Orders {
    async fn get_cart(&self, req: Request<GetCartRequest>) -> Result<Response<Cart>, Status> {
        let id = require(&req, Role::Customer)?;
        reply(self.cart(&id.user_id).await)
    }

    #[tracing::instrument(skip_all, fields(product_id = %req.get_ref().product_id))]
    async fn add_cart_item(
        &self,
        req: Request<AddCartItemRequest>,
    ) -> Result<Response<Cart>, Status> {
        let id = require(&req, Role::Customer)?;
        let r = req.into_inner();
        reply(self.add_item(&id.user_id, &r.product_id, r.quantity).await)
    }

    #[tracing::instrument(skip_all, fields(product_id = %req.get_ref().product_id))]
    async fn set_cart_item_quantity(
        &self,
        req: Request<SetCartItemQuantityRequest>,
    ) -> Result<Response<Cart>, Status> {
        let id = require(&req, Role::Customer)?;
        let r = req.into_inner();
        reply(
            self.set_quantity(&id.user_id, &r.product_id, r.quantity)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(product_id = %req.get_ref().product_id))]
    async fn remove_cart_item(
        &self,
        req: Request<RemoveCartItemRequest>,
    ) -> Result<Response<Cart>, Status> {
        let id = require(&req, Role::Customer)?;
        reply(
            self.remove_item(&id.user_id, &req.get_ref().product_id)
                .await,
        )
    }

    async fn clear_cart(&self, req: Request<ClearCartRequest>) -> Result<Response<Cart>, Status> {
        let id = require(&req, Role::Customer)?;
        reply(self.clear(&id.user_id).await)
    }

    async fn checkout(&self, req: Request<CheckoutRequest>) -> Result<Response<Order>, Status> {
        let id = require(&req, Role::Customer)?;
        let tp = traceparent(&req);
        reply(
            self.checkout(&id.user_id, req.into_inner(), tp.as_deref())
                .await
                .map(|o| order_to_proto(&o)),
        )
    }

    async fn list_my_orders(
        &self,
        req: Request<ListMyOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let id = require(&req, Role::Customer)?;
        let r = req.into_inner();
        reply(
            self.list(Some(&id.user_id), None, r.page_size, &r.page_token)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn get_order(&self, req: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        let id = require(&req, Role::Customer)?;
        reply(
            self.visible(&id, &req.get_ref().order_id)
                .await
                .map(|o| order_to_proto(&o)),
        )
    }

    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn cancel_order(
        &self,
        req: Request<CancelOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let id = require(&req, Role::Customer)?;
        let r = req.into_inner();
        reply(
            self.cancel(&id, &r.order_id, &r.reason)
                .await
                .map(|o| order_to_proto(&o)),
        )
    }

    async fn admin_list_orders(
        &self,
        req: Request<AdminListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        require(&req, Role::Admin)?;
        let r = req.into_inner();
        let status = OrderStatus::try_from(r.status)
            .map_err(|_| Status::from(ServiceError::invalid("status", "unknown status")))?;
        reply(
            self.list(
                None,
                OrderState::from_proto(status),
                r.page_size,
                &r.page_token,
            )
            .await,
        )
    }
}
