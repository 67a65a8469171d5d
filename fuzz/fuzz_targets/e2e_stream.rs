#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sgl::proto::fuzzing::e2e_stream(data));
