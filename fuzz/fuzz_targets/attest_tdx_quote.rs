#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sgl::attest::fuzzing::tdx_quote(data));
