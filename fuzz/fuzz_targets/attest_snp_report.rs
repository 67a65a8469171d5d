#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sgl::attest::fuzzing::snp_report(data));
