//! Integration tests for the `berth` registry binary, driven over HTTP against the
//! OCI Distribution Specification v1.1.

mod pki;
mod support;

mod api_base;
mod backup;
mod blobs;
mod clients;
mod cluster;
mod concurrency;
mod deploy;
mod disk_full;
mod durability;
mod errors;
mod lifecycle;
mod limits;
mod manifests;
mod memory;
mod podman;
mod pull_through;
mod referrers;
mod replication;
mod s3_store;
mod scrub;
mod security;
mod skopeo;
mod tags_catalog;
mod tls;
mod transfer;
mod ui;
mod uploads;
mod upstream;
