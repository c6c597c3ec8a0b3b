//! Arbitrary bytes as a command and as a response: decoding never panics, and
//! whatever decodes re-encodes to bytes that decode to the same value.
#![no_main]

use gpu_pv::command::{self, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match command::decode(data) {
        Ok(req) => {
            let mut bytes = Vec::new();
            command::encode(&req, &mut bytes);
            // Re-encoding never needs more than the guest sent (extra bytes are ignored).
            assert!(bytes.len() <= data.len());
            assert_eq!(command::decode(&bytes).as_ref(), Ok(&req));
            // The answer echoes the fence.
            let mut resp = Vec::new();
            Response::OkNoData.encode(&req.hdr, &mut resp);
            let (hdr, _) = Response::decode(&resp).expect("own response decodes");
            assert_eq!(
                hdr.fence_id,
                if req.hdr.flags & 1 != 0 {
                    req.hdr.fence_id
                } else {
                    0
                }
            );
        }
        Err(e) => {
            let code = e.response_type();
            assert!((0x1200..=0x12ff).contains(&code));
        }
    }
    if let Ok((hdr, resp)) = Response::decode(data) {
        let mut bytes = Vec::new();
        resp.encode(&hdr, &mut bytes);
        let (_, again) = Response::decode(&bytes).expect("re-encoded response decodes");
        assert_eq!(again, resp);
    }
});
