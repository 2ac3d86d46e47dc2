//! The tonic service: roles checked, the use case in [`crate::app`] called, the reply mapped.

use shopverse_kit::ServiceError;
use shopverse_kit::identity::{Identity, Role, require};
use shopverse_proto::products::v1::products_service_server::ProductsService;
use shopverse_proto::products::v1::*;
use tonic::{Request, Response, Status};

use crate::app::*;

fn reply<T>(r: Result<T, ServiceError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl ProductsService for Products {
    async fn list_categories(
        &self,
        _req: Request<ListCategoriesRequest>,
    ) -> Result<Response<ListCategoriesResponse>, Status> {
        reply(
            self.list_categories()
                .await
                .map(|categories| ListCategoriesResponse { categories }),
        )
    }

    async fn create_category(
        &self,
        req: Request<CreateCategoryRequest>,
    ) -> Result<Response<Category>, Status> {
        require(&req, Role::Admin)?;
        reply(self.create_category(req.into_inner()).await)
    }

    async fn list_products(
        &self,
        req: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        let caller = Identity::from_metadata(req.metadata());
        reply(self.list_products(req.into_inner(), caller.as_ref()).await)
    }

    #[tracing::instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn get_product(
        &self,
        req: Request<GetProductRequest>,
    ) -> Result<Response<Product>, Status> {
        let caller = Identity::from_metadata(req.metadata());
        reply(
            self.get_product(&req.get_ref().id, caller.as_ref())
                .await
                .map(|p| product_to_proto(&p)),
        )
    }

    #[tracing::instrument(skip_all, fields(sku = %req.get_ref().sku))]
    async fn get_product_by_sku(
        &self,
        req: Request<GetProductBySkuRequest>,
    ) -> Result<Response<Product>, Status> {
        let caller = Identity::from_metadata(req.metadata());
        let sku = &req.get_ref().sku;
        if sku.is_empty() {
            return Err(ServiceError::invalid("sku", "is required").into());
        }
        let found = self
            .repo()
            .product_by_sku(sku)
            .await
            .map_err(ServiceError::from)?;
        reply(Self::visible(found, caller.as_ref(), sku).map(|p| product_to_proto(&p)))
    }

    async fn create_product(
        &self,
        req: Request<CreateProductRequest>,
    ) -> Result<Response<Product>, Status> {
        require(&req, Role::Admin)?;
        reply(
            self.create_product(req.into_inner())
                .await
                .map(|p| product_to_proto(&p)),
        )
    }

    #[tracing::instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn update_product(
        &self,
        req: Request<UpdateProductRequest>,
    ) -> Result<Response<Product>, Status> {
        require(&req, Role::Admin)?;
        reply(
            self.update_product(req.into_inner())
                .await
                .map(|p| product_to_proto(&p)),
        )
    }

    #[tracing::instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn archive_product(
        &self,
        req: Request<ArchiveProductRequest>,
    ) -> Result<Response<Product>, Status> {
        require(&req, Role::Admin)?;
        reply(
            self.archive_product(req.into_inner())
                .await
                .map(|p| product_to_proto(&p)),
        )
    }

    #[tracing::instrument(skip_all, fields(product_id = %req.get_ref().product_id))]
    async fn get_stock(&self, req: Request<GetStockRequest>) -> Result<Response<Stock>, Status> {
        reply(self.get_stock(&req.get_ref().product_id).await)
    }

    #[tracing::instrument(skip_all, fields(product_id = %req.get_ref().product_id))]
    async fn set_stock(&self, req: Request<SetStockRequest>) -> Result<Response<Stock>, Status> {
        require(&req, Role::Admin)?;
        reply(self.set_stock(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn reserve_stock(
        &self,
        req: Request<ReserveStockRequest>,
    ) -> Result<Response<Reservation>, Status> {
        reply(self.reserve(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn commit_reservation(
        &self,
        req: Request<ReservationRef>,
    ) -> Result<Response<Reservation>, Status> {
        reply(self.settle(&req.get_ref().order_id, "COMMITTED").await)
    }

    #[tracing::instrument(skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn release_reservation(
        &self,
        req: Request<ReservationRef>,
    ) -> Result<Response<Reservation>, Status> {
        reply(self.settle(&req.get_ref().order_id, "RELEASED").await)
    }
}
