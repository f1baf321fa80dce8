//! Code generated from `proto/` by `cargo run -p codegen` (never edit it).
#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub, dead_code)]

pub(crate) mod google {
    pub(crate) mod rpc {
        include!("gen/google.rpc.rs");
    }
}

pub(crate) mod pluginframework {
    pub(crate) mod v1 {
        include!("gen/pluginframework.v1.rs");
    }
}
