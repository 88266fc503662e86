//! Generated gRPC types for the SLIM APIs, from the operator's own `.proto` subset in `proto/slim`.
//! Module nesting mirrors the proto packages exactly, so cross-package references resolve.
#![allow(clippy::all, missing_docs)]

pub mod dataplane {
    pub mod proto {
        pub mod v1 {
            tonic::include_proto!("dataplane.proto.v1");
        }
    }
    pub use proto::v1;
}

pub mod controller {
    pub mod proto {
        pub mod v1 {
            tonic::include_proto!("controller.proto.v1");
        }
    }
    pub use proto::v1;
}

pub mod channel_manager {
    pub mod proto {
        pub mod v1 {
            tonic::include_proto!("channel_manager.proto.v1");
        }
    }
    pub use proto::v1;
}
