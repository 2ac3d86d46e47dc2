//! ShopVerse as a library: the configuration of the whole process, the table of services, and
//! the [`Appliance`] that runs any set of them with the gateway in one process. The `shopverse`
//! binary is a command line over it; tests and the benchmark start it in-process.

#![forbid(unsafe_code)]

pub mod appliance;
pub mod chain;
pub mod config;
pub mod demo;
pub mod services;

pub use appliance::{Appliance, ApplianceError, Running};
pub use config::AppConfig;
