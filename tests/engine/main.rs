//! The engine and the node's local server: the real model, backends, devices, HTTP and the OpenAI SDK.
//!
//! One test binary per area, so that a test run links few binaries; each
//! file below is one former test target.
#[path = "../support/engine/mod.rs"]
mod engine_support;

mod engine_backends;
mod engine_choices;
mod engine_device;
mod engine_json;
mod engine_model;
mod engine_qwen2;
mod engine_safetensors;
mod engine_tools;
mod openai_sdk;
mod serve_http;
