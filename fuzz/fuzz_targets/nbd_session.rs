//! The NBD server's option-haggling and transmission parsers: `data` is
//! everything a client sends over one connection.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark_nbd::fuzz_session(data);
});
