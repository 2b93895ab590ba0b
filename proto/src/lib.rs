//! The pixfarm gRPC API, `pixfarm.v1`, and its generated tonic/prost code.
//!
//! `pixfarm.proto` beside this crate is the one public API of the farm; this
//! crate only compiles it (with the pure-Rust `protox`, so no `protoc` is
//! needed) and re-exports the result, so every other crate shares one copy of
//! the generated types. [`FILE_DESCRIPTOR_SET`] lets the coordinator serve
//! gRPC reflection, so `grpcurl` works without the `.proto` file.
//!
//! ```no_run
//! use pixfarm_proto::v1::{farm_client::FarmClient, GetJobRequest};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = FarmClient::connect("http://127.0.0.1:50051").await?;
//! let job = client
//!     .get_job(GetJobRequest { job_id: "0190...".into() })
//!     .await?
//!     .into_inner();
//! println!("{} images done", job.done);
//! # Ok(())
//! # }
//! ```

/// Generated messages, the `Farm` client and the `Farm` server trait.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pixfarm.v1");
}

/// The encoded `FileDescriptorSet` of `pixfarm.proto`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pixfarm_descriptor.bin"));
