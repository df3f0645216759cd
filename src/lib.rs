//! Dispatch gateway: the function invocation data plane of a serverless platform, speaking
//! VMware Dispatch's v0.1.24 API and OpenFaaS' gateway API. See DESIGN.md and
//! docs/architecture.md for the map; the names below follow it.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod body;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod drivers;
pub mod error;
pub mod events;
pub mod ingress;
pub mod invoke;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod records;
pub mod registry;
pub mod schema;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
