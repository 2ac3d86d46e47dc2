//! Generated code for every ShopVerse protobuf package, and the encoded descriptor set.
//!
//! The `.proto` files live in the workspace's `proto/` folder and are compiled by `build.rs`
//! with `protox`, so no system `protoc` is needed. Modules mirror the protobuf packages:
//! `shopverse_proto::users::v1` is `shopverse.users.v1`. [`FILE_DESCRIPTOR_SET`] is the encoded
//! `google.protobuf.FileDescriptorSet` of all of them (imports included): gRPC reflection serves
//! it, and the gateway derives its REST routes from the `google.api.http` rules in it.

#![allow(clippy::all, missing_docs, unreachable_pub)]

/// The encoded `FileDescriptorSet` of every ShopVerse proto and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shopverse_descriptor.bin"));

pub mod google {
    pub mod api {
        include!(concat!(env!("OUT_DIR"), "/google.api.rs"));
    }
}

pub mod shopverse {
    pub mod api {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.api.v1.rs"));
        }
    }
    pub mod common {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.common.v1.rs"));
        }
    }
    pub mod events {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.events.v1.rs"));
        }
    }
    pub mod users {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.users.v1.rs"));
        }
    }
    pub mod products {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.products.v1.rs"));
        }
    }
    pub mod orders {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.orders.v1.rs"));
        }
    }
    pub mod payments {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.payments.v1.rs"));
        }
    }
    pub mod notifications {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.notifications.v1.rs"));
        }
    }
    pub mod delivery {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shopverse.delivery.v1.rs"));
        }
    }
}

pub use shopverse::{
    api, common, delivery, events, notifications, orders, payments, products, users,
};
