use super::*;
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

fn limits() -> Limits {
    Limits {
        export_size: SIZE,
        read_only: false,
        structured: true,
        block_status: true,
    }
}

fn hdr(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: 7,
        offset,
        length,
    }
}

fn errno(h: RequestHeader, l: Limits) -> u32 {
    validate(&h, &l).unwrap_err().to_errno()
}

#[test]
fn magic_is_checked() {
    let mut b = hdr(CMD_READ, 0, 0, 512).encode();
    assert_eq!(parse_header(&b).unwrap().length, 512);
    b[0] = 0;
    assert!(matches!(parse_header(&b), Err(FatalError::BadMagic(_))));
}

#[test]
fn valid_requests_pass() {
    let r = validate(
        &hdr(CMD_READ, CMD_FLAG_DF | CMD_FLAG_FUA, 4096, 4096),
        &limits(),
    )
    .unwrap();
    assert_eq!(r.command, Command::Read);
    assert!(r.flags.df() && r.flags.fua());
    let z = validate(
        &hdr(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            0,
            10,
        ),
        &limits(),
    )
    .unwrap();
    assert!(z.flags.no_hole() && z.flags.fast_zero());
    assert!(
        validate(&hdr(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1), &limits())
            .unwrap()
            .flags
            .req_one()
    );
    // zero-length requests and a request ending exactly at the end are fine
    assert!(validate(&hdr(CMD_READ, 0, SIZE, 0), &limits()).is_ok());
    assert!(validate(&hdr(CMD_WRITE, 0, SIZE - 1, 1), &limits()).is_ok());
    // FLUSH and DISC ignore offset/length
    assert!(validate(&hdr(CMD_FLUSH, CMD_FLAG_FUA, u64::MAX, 5), &limits()).is_ok());
    assert!(validate(&hdr(CMD_DISC, 0, 0, 0), &limits()).is_ok());
    // large trims are allowed (qemu ignores the max block size for discard)
    let big = Limits {
        export_size: 1 << 40,
        ..limits()
    };
    assert!(validate(&hdr(CMD_TRIM, 0, 0, u32::MAX), &big).is_ok());
}

#[test]
fn errno_table() {
    assert_eq!(errno(hdr(99, 0, 0, 0), limits()), EINVAL);
    assert_eq!(
        errno(hdr(CMD_READ, CMD_FLAG_REQ_ONE, 0, 1), limits()),
        EINVAL
    );
    assert_eq!(errno(hdr(CMD_WRITE, CMD_FLAG_DF, 0, 1), limits()), EINVAL);
    assert_eq!(
        errno(hdr(CMD_TRIM, CMD_FLAG_FAST_ZERO, 0, 1), limits()),
        EINVAL
    );
    assert_eq!(errno(hdr(CMD_READ, 0x100, 0, 1), limits()), EINVAL);
    let simple = Limits {
        structured: false,
        ..limits()
    };
    assert_eq!(
        validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &simple),
        Err(RequestError::DfWithoutStructured)
    );
    assert_eq!(errno(hdr(CMD_READ, 0, SIZE, 1), limits()), EINVAL);
    assert_eq!(errno(hdr(CMD_TRIM, 0, SIZE - 1, 2), limits()), EINVAL);
    assert_eq!(errno(hdr(CMD_BLOCK_STATUS, 0, SIZE, 1), limits()), EINVAL);
    assert_eq!(errno(hdr(CMD_WRITE, 0, SIZE, 1), limits()), ENOSPC);
    assert_eq!(
        errno(hdr(CMD_WRITE_ZEROES, 0, u64::MAX, 2), limits()),
        ENOSPC
    );
    assert_eq!(errno(hdr(CMD_READ, 0, u64::MAX, 2), limits()), EINVAL);
    let ro = Limits {
        read_only: true,
        ..limits()
    };
    for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
        assert_eq!(errno(hdr(cmd, 0, 0, 1), ro), EPERM);
    }
    assert!(validate(&hdr(CMD_READ, 0, 0, 1), &ro).is_ok());
    let huge = Limits {
        export_size: 1 << 40,
        ..limits()
    };
    assert_eq!(errno(hdr(CMD_READ, 0, 0, MAX_PAYLOAD + 1), huge), EINVAL);
    let no_ctx = Limits {
        block_status: false,
        ..limits()
    };
    assert_eq!(errno(hdr(CMD_BLOCK_STATUS, 0, 0, 1), no_ctx), EINVAL);
    assert_eq!(errno(hdr(CMD_BLOCK_STATUS, 0, 0, 0), limits()), EINVAL);
}

#[test]
fn write_payload_tiers() {
    assert_eq!(hdr(CMD_WRITE, 0, 0, 4096).payload_len(), Ok(4096));
    assert_eq!(hdr(CMD_READ, 0, 0, 4096).payload_len(), Ok(0));
    assert_eq!(
        hdr(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1).payload_len(),
        Err(FatalError::PayloadTooLarge(MAX_PAYLOAD + 1))
    );
}

proptest! {
    #[test]
    fn header_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let h = RequestHeader { flags, command, cookie, offset, length };
        prop_assert_eq!(parse_header(&h.encode()), Ok(h));
    }

    #[test]
    fn validated_requests_are_in_bounds(flags: u16, command in 0u16..10, offset: u64, length: u32,
                                         size in 0u64..(1 << 41), ro: bool, st: bool) {
        let l = Limits { export_size: size, read_only: ro, structured: st, block_status: true };
        if let Ok(r) = validate(&hdr(command, flags, offset, length), &l) {
            if !matches!(r.command, Command::Flush | Command::Disconnect) {
                prop_assert!(r.offset.checked_add(u64::from(r.length)).unwrap() <= size);
            }
            prop_assert!(!(ro && r.command.is_write()));
            prop_assert!(!r.flags.df() || st);
        }
    }
}
