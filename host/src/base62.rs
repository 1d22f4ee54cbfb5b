//! Base62 as `jxskiss/base62` StdEncoding writes it (reference §5.1), the text form
//! of Talos node IDs.
//!
//! This is a bit-packing code, not big-integer base62: it reads the input from the
//! least significant end in 6-bit groups, and the symbols 30, 31, 62 and 63 (which a
//! 6-bit group could produce but 62 symbols cannot hold) are written as 30/31 carrying
//! only 5 bits. A generic base62 crate gives different strings, so IDs would not
//! match the ones real Talos nodes print.

use thiserror::Error;

const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Marks bytes outside the alphabet in [`DECODE`].
const INVALID: u8 = 0xFF;

/// Byte → symbol value, built at compile time from [`ALPHABET`].
const DECODE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// The input holds a byte that is not a base62 symbol; `0` is its byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("illegal base62 data at input byte {0}")]
pub struct Base62Error(pub usize);

/// Encodes `src`; empty input gives an empty string.
pub fn encode(src: &[u8]) -> String {
    let mut out = String::with_capacity(src.len() * 9 / 5 + 1);
    let mut pos = src.len() * 8;
    while pos > 0 {
        let (mut v, mut used) = if pos >= 6 {
            (bits(src, pos - 6, 6), 6)
        } else {
            (bits(src, 0, pos), pos)
        };
        if v & 0x1E == 0x1E {
            // 62 symbols cannot hold 30, 31, 62, 63 as 6 bits: emit the low 5 bits and
            // read the dropped top bit again with the next group. The last group keeps
            // its value when it fits, so it needs no extra symbol.
            if pos > 6 || v > 31 {
                used = 5;
            }
            v &= 0x1F;
        }
        out.push(ALPHABET[v as usize] as char);
        pos -= used;
    }
    out
}

/// Decodes what [`encode`] wrote. Whole-byte inputs round-trip exactly, leading zero
/// bytes included.
pub fn decode(src: &str) -> Result<Vec<u8>, Base62Error> {
    let src = src.as_bytes();
    let mut out = Vec::with_capacity(src.len() * 6 / 8 + 1);
    let mut acc: u32 = 0;
    let mut nbits: u32 = 0;
    for (i, &c) in src.iter().enumerate() {
        let x = DECODE[c as usize];
        if x == INVALID {
            return Err(Base62Error(i));
        }
        let width = if i == src.len() - 1 {
            // The last symbol carries only its significant bits.
            u8::BITS - x.leading_zeros()
        } else if x & 0x1E == 0x1E {
            5
        } else {
            6
        };
        acc |= u32::from(x) << nbits;
        nbits += width;
        if nbits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            nbits -= 8;
        }
    }
    if nbits > 0 {
        out.push(acc as u8);
    }
    // Bytes come out least significant first.
    out.reverse();
    Ok(out)
}

/// Reads `len` (≤ 6) bits of `src`, seen as an MSB-first bit string, starting at bit
/// `start`, as a number whose most significant bit is the first one read.
fn bits(src: &[u8], start: usize, len: usize) -> u8 {
    let byte = start / 8;
    // Two bytes cover any 6-bit window; past the end counts as zero bits.
    let hi = u16::from(src[byte]);
    let lo = src.get(byte + 1).map_or(0, |&b| u16::from(b));
    let window = (hi << 8) | lo;
    let shift = 16 - (start % 8) - len;
    ((window >> shift) & ((1 << len) - 1)) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// The vectors of reference §5.1.
    #[test]
    fn encodes_reference_vectors() {
        assert_eq!(encode(&[0x00; 32]), "A".repeat(43));
        assert_eq!(encode(&[0xFF; 32]), format!("{}B", "f".repeat(51)));
        let counting: Vec<u8> = (0..=31).collect();
        assert_eq!(
            encode(&counting),
            "fwjO4YDNyAjLsoCKmQiIg4BHaghFUIBEOwgCIYABCAA"
        );
    }

    #[test]
    fn decodes_reference_vectors() {
        assert_eq!(decode(&"A".repeat(43)).unwrap(), vec![0x00; 32]);
        assert_eq!(
            decode(&format!("{}B", "f".repeat(51))).unwrap(),
            vec![0xFF; 32]
        );
        assert_eq!(
            decode("fwjO4YDNyAjLsoCKmQiIg4BHaghFUIBEOwgCIYABCAA").unwrap(),
            (0..=31).collect::<Vec<u8>>()
        );
    }

    /// A Talos node ID (reference §5.1, row 4) and the machine-id derived from it
    /// (§5.2: the first 16 bytes in lowercase hex).
    #[test]
    fn decodes_talos_node_id() {
        let id = "sou7yy34ykX3n373Zw1DXKb8zD7UnyKT6HT3QDsGH6L";
        let bytes = decode(id).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            "be871ac0d0dd31fa4caca753b0f3f1b2970f5c19dfbde7dd7932e37cb2eeea2c"
        );
        assert_eq!(
            hex::encode(&bytes[..16]),
            "be871ac0d0dd31fa4caca753b0f3f1b2"
        );
        assert_eq!(encode(&bytes), id);
    }

    #[test]
    fn empty_is_empty() {
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn random_inputs_round_trip() {
        let mut rng = rand::rng();
        for len in 0..=80 {
            for _ in 0..50 {
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                // Leading zero bytes (and 0xFF runs, which take the 5-bit path) are
                // where a sloppy implementation loses or invents bytes.
                let lead = rng.random_range(0..=len);
                let fill = if rng.random_bool(0.5) { 0x00 } else { 0xFF };
                data[..lead].fill(fill);
                let text = encode(&data);
                assert!(text.bytes().all(|c| ALPHABET.contains(&c)), "{text}");
                assert_eq!(decode(&text).unwrap(), data, "len {len}: {text}");
            }
        }
    }

    /// Random 32-byte node IDs are 43 to 52 characters (§5.1).
    #[test]
    fn node_id_lengths_stay_in_range() {
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let id: [u8; 32] = rng.random();
            let len = encode(&id).len();
            assert!((43..=52).contains(&len), "{len}");
        }
    }

    #[test]
    fn rejects_illegal_characters_with_their_byte_offset() {
        assert_eq!(decode("AB-C"), Err(Base62Error(2)));
        assert_eq!(decode("+"), Err(Base62Error(0)));
        assert_eq!(decode("AAAA="), Err(Base62Error(4)));
        // A multi-byte character: the offset counts bytes, as Go does.
        assert_eq!(decode("Aé"), Err(Base62Error(1)));
        assert_eq!(
            decode("AB C").unwrap_err().to_string(),
            "illegal base62 data at input byte 2"
        );
    }
}
