#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sgl::attest::fuzzing::evidence_json(data));
