//! RGB images: reading QEMU's PPM screendumps, writing PNG (zlib stored blocks, no
//! compression library), and the pixel facts the screendump checks use.

use crate::Result;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes: R, G, B of each pixel.
    pub rgb: Vec<u8>,
}

/// `0x00RRGGBB` as `#rrggbb`.
pub fn hex(color: u32) -> String {
    format!("#{:06x}", color & 0x00ff_ffff)
}

/// The R, G, B components of `0x00RRGGBB`.
pub fn channels(color: u32) -> [u8; 3] {
    [(color >> 16) as u8, (color >> 8) as u8, color as u8]
}

/// True when every channel of `a` and `b` differs by at most `tolerance`.
pub fn colors_match(a: u32, b: u32, tolerance: u8) -> bool {
    channels(a)
        .iter()
        .zip(channels(b))
        .all(|(x, y)| x.abs_diff(y) <= tolerance)
}

/// The most common colour of an image and how much of it there is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dominant {
    /// `0x00RRGGBB`: the mean colour of the most populated histogram bucket (16 levels
    /// per channel), which is the exact colour when the bucket holds only one.
    pub color: u32,
    /// Pixels in that bucket.
    pub pixels: u64,
    /// `pixels` over all pixels (0 for an empty image).
    pub share: f64,
}

/// The grey of the text QEMU draws on a console no guest has set up.
const PLACEHOLDER_TEXT: u32 = 0x00aa_aaaa;

impl Image {
    /// A `width` x `height` image filled with `color`.
    pub fn new(width: u32, height: u32, color: u32) -> Image {
        let px = channels(color);
        let n = width as usize * height as usize;
        let mut rgb = Vec::with_capacity(n * 3);
        for _ in 0..n {
            rgb.extend_from_slice(&px);
        }
        Image { width, height, rgb }
    }

    /// Number of pixels.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// The colour at (x, y) as `0x00RRGGBB`; `None` outside the image.
    #[cfg(test)]
    pub fn get(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        let p = &self.rgb[i..i + 3];
        Some(u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2]))
    }

    /// Sets (x, y) to `color`; ignores points outside the image.
    pub fn set(&mut self, x: i64, y: i64, color: u32) {
        if x < 0 || y < 0 || x >= i64::from(self.width) || y >= i64::from(self.height) {
            return;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        self.rgb[i..i + 3].copy_from_slice(&channels(color));
    }

    /// Iterates over the pixels as `0x00RRGGBB`.
    pub fn colors(&self) -> impl Iterator<Item = u32> + '_ {
        self.rgb
            .chunks_exact(3)
            .map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2]))
    }

    /// Parses a binary PPM (`P6`, as QEMU's `screendump` writes it): header fields
    /// separated by whitespace, `#` comments, any maxval up to 65535 (scaled to 8 bits).
    pub fn parse_ppm(bytes: &[u8]) -> Result<Image> {
        if bytes.get(..2) != Some(b"P6") {
            return Err("PPM: not a binary PPM (no \"P6\" magic)".into());
        }
        let mut pos = 2;
        let mut field = |name: &str| -> Result<u32> {
            loop {
                match bytes.get(pos) {
                    Some(b'#') => {
                        while bytes.get(pos).is_some_and(|&b| b != b'\n') {
                            pos += 1;
                        }
                    }
                    Some(b) if b.is_ascii_whitespace() => pos += 1,
                    Some(_) => break,
                    None => return Err(format!("PPM: the header ends before the {name}")),
                }
            }
            let start = pos;
            while bytes.get(pos).is_some_and(u8::is_ascii_digit) {
                pos += 1;
            }
            std::str::from_utf8(&bytes[start..pos])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("PPM: bad {name} at byte {start}"))
        };
        let width = field("width")?;
        let height = field("height")?;
        let maxval = field("maxval")?;
        if width == 0 || height == 0 {
            return Err(format!("PPM: empty image ({width}x{height})"));
        }
        if !(1..=65535).contains(&maxval) {
            return Err(format!("PPM: maxval {maxval} out of range"));
        }
        // Exactly one whitespace byte separates the header from the samples.
        if !bytes.get(pos).is_some_and(u8::is_ascii_whitespace) {
            return Err("PPM: no whitespace after the maxval".into());
        }
        pos += 1;
        let samples = u64::from(width) * u64::from(height) * 3;
        let per = if maxval > 255 { 2 } else { 1 };
        let need = samples * per;
        let data = &bytes[pos..];
        if (data.len() as u64) < need {
            return Err(format!(
                "PPM: {width}x{height} needs {need} bytes of samples, the file has {}",
                data.len()
            ));
        }
        let rgb: Vec<u8> = if maxval == 255 {
            data[..samples as usize].to_vec()
        } else if per == 1 {
            data[..samples as usize]
                .iter()
                .map(|&v| ((u32::from(v) * 255 + maxval / 2) / maxval).min(255) as u8)
                .collect()
        } else {
            data[..need as usize]
                .chunks_exact(2)
                .map(|v| {
                    let v = u32::from(u16::from_be_bytes([v[0], v[1]]));
                    ((v * 255 + maxval / 2) / maxval).min(255) as u8
                })
                .collect()
        };
        Ok(Image { width, height, rgb })
    }

    /// The image as a compressed PNG file (8-bit RGB), written by the `png` crate.
    pub fn to_png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let written = enc
            .write_header()
            .and_then(|mut w| w.write_image_data(&self.rgb));
        // Writing into memory fails only on a size mismatch, which `Image` rules out.
        if let Err(e) = written {
            unreachable!("PNG of a {}x{} image: {e}", self.width, self.height);
        }
        out
    }

    /// The dominant colour: the most populated bucket of a 16-level-per-channel
    /// histogram, as the mean of its pixels (so a slightly shaded background still has
    /// one dominant colour).
    pub fn dominant(&self) -> Dominant {
        let mut count = vec![0u64; 4096];
        let mut sum = vec![[0u64; 3]; 4096];
        for p in self.rgb.chunks_exact(3) {
            let b = (usize::from(p[0] >> 4) << 8)
                | (usize::from(p[1] >> 4) << 4)
                | usize::from(p[2] >> 4);
            count[b] += 1;
            for c in 0..3 {
                sum[b][c] += u64::from(p[c]);
            }
        }
        let (best, &n) = count
            .iter()
            .enumerate()
            .max_by_key(|&(i, n)| (*n, std::cmp::Reverse(i)))
            .unwrap_or((0, &0));
        if n == 0 {
            return Dominant {
                color: 0,
                pixels: 0,
                share: 0.0,
            };
        }
        let mean = |c: usize| ((sum[best][c] + n / 2) / n) as u32;
        Dominant {
            color: mean(0) << 16 | mean(1) << 8 | mean(2),
            pixels: n,
            share: n as f64 / self.pixels() as f64,
        }
    }

    /// The share of pixels within `tolerance` (per channel) of `color`.
    pub fn share_near(&self, color: u32, tolerance: u8) -> f64 {
        if self.pixels() == 0 {
            return 0.0;
        }
        let n = self
            .colors()
            .filter(|&c| colors_match(c, color, tolerance))
            .count();
        n as f64 / self.pixels() as f64
    }

    /// True for QEMU's "Guest has not initialized the display (yet)." screen: black
    /// with a little text in grey `#aaaaaa`, nothing else.
    pub fn is_qemu_placeholder(&self) -> bool {
        let mut text = 0u64;
        for c in self.colors() {
            match c {
                0 => {}
                PLACEHOLDER_TEXT => text += 1,
                _ => return false,
            }
        }
        // The message covers about 0.3 % of a 640x480 screen.
        text > 0 && text * 50 < self.pixels()
    }

    /// Band `band` of `bands` equal horizontal bands (counted from the top): rows
    /// `band * h .. (band + 1) * h` with `h = height / bands`, so the rows left over when
    /// the height is not a multiple of `bands` (at the bottom) belong to no band.
    /// `None` when `band >= bands` or the image has fewer rows than `bands`.
    pub fn band(&self, band: u32, bands: u32) -> Option<Image> {
        let (y0, y1) = band_rows(self.height, band, bands)?;
        let row = self.width as usize * 3;
        Some(Image {
            width: self.width,
            height: y1 - y0,
            rgb: self.rgb[y0 as usize * row..y1 as usize * row].to_vec(),
        })
    }

    /// Pixels that differ between two images of the same size (`None` if the sizes
    /// differ).
    pub fn differing_pixels(&self, other: &Image) -> Option<u64> {
        if (self.width, self.height) != (other.width, other.height) {
            return None;
        }
        let n = self
            .rgb
            .chunks_exact(3)
            .zip(other.rgb.chunks_exact(3))
            .filter(|(a, b)| a != b)
            .count();
        Some(n as u64)
    }
}

/// The rows `y0..y1` of band `band` of `bands` equal horizontal bands of an image
/// `height` rows high (see [`Image::band`]); `None` when there is no such band.
pub fn band_rows(height: u32, band: u32, bands: u32) -> Option<(u32, u32)> {
    if bands == 0 || band >= bands || height < bands {
        return None;
    }
    let h = height / bands;
    Some((band * h, (band + 1) * h))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Decodes an 8-bit RGB PNG (what [`Image::to_png`] writes) with the `png` crate,
    /// which checks the signature, chunk CRCs and the zlib stream.
    pub(crate) fn decode_png(png: &[u8]) -> Image {
        let mut reader = png::Decoder::new(png).read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut rgb).unwrap();
        assert_eq!(
            (info.color_type, info.bit_depth),
            (png::ColorType::Rgb, png::BitDepth::Eight)
        );
        rgb.truncate(info.buffer_size());
        Image {
            width: info.width,
            height: info.height,
            rgb,
        }
    }

    /// A PPM file of `img` with the given header text.
    fn ppm(header: &str, img: &Image) -> Vec<u8> {
        let mut v = header.as_bytes().to_vec();
        v.extend_from_slice(&img.rgb);
        v
    }

    /// Something like QEMU's placeholder: black, a grey text band in the middle.
    pub(crate) fn placeholder(w: u32, h: u32) -> Image {
        let mut img = Image::new(w, h, 0);
        for x in (w / 4..w * 3 / 4).step_by(3) {
            for y in h / 2 - 6..h / 2 + 6 {
                if (x + y) % 5 == 0 {
                    img.set(i64::from(x), i64::from(y), PLACEHOLDER_TEXT);
                }
            }
        }
        img
    }

    #[test]
    fn ppm_parsing() {
        let mut img = Image::new(3, 2, 0x102030);
        img.set(2, 1, 0xc03030);
        let p = Image::parse_ppm(&ppm("P6\n3 2\n255\n", &img)).unwrap();
        assert_eq!(p, img);
        assert_eq!(p.get(2, 1), Some(0xc03030));
        assert_eq!(p.get(0, 0), Some(0x102030));
        assert_eq!(p.get(3, 0), None);
        // Comments and other whitespace in the header.
        let p = Image::parse_ppm(&ppm("P6 # qemu\n# size\n3\t2 255\n", &img)).unwrap();
        assert_eq!(p, img);
        // A smaller maxval is scaled up.
        let small = Image {
            width: 1,
            height: 1,
            rgb: vec![15, 0, 7],
        };
        let p = Image::parse_ppm(&ppm("P6 1 1 15\n", &small)).unwrap();
        assert_eq!(p.rgb, vec![255, 0, 119]);
        // 16-bit samples, big endian.
        let mut wide = b"P6 1 1 65535\n".to_vec();
        wide.extend_from_slice(&[0xff, 0xff, 0x80, 0x00, 0x00, 0x00]);
        assert_eq!(Image::parse_ppm(&wide).unwrap().rgb, vec![255, 128, 0]);
        // Broken files.
        assert!(Image::parse_ppm(b"P3 1 1 255\n1 2 3").is_err());
        assert!(Image::parse_ppm(b"P6 2 2 255\n\0\0\0").is_err());
        assert!(Image::parse_ppm(b"P6 0 2 255\n").is_err());
        assert!(Image::parse_ppm(b"P6 1 1 0\n\0\0\0").is_err());
        assert!(Image::parse_ppm(b"P6 1 1").is_err());
        assert!(Image::parse_ppm(b"P6 1 x 255\n\0\0\0").is_err());
        assert!(Image::parse_ppm(b"").is_err());
    }

    #[test]
    fn png_round_trip() {
        for (w, h) in [(1, 1), (7, 3), (300, 250)] {
            let mut img = Image::new(w, h, 0x3050c0);
            for i in 0..w.min(h) {
                img.set(i64::from(i), i64::from(i), 0xffffff);
            }
            assert_eq!(decode_png(&img.to_png()), img);
        }
        // Compressed: a flat 640x480 head is far below its 921,600 raw bytes.
        let flat = Image::new(640, 480, 0x3050c0).to_png();
        assert!(flat.len() < 20_000, "{} bytes", flat.len());
    }

    #[test]
    fn dominant_colour_and_match() {
        let mut img = Image::new(100, 100, 0xc03030);
        // A white box and a shaded stripe: the background still dominates.
        for y in 0..30 {
            for x in 0..30 {
                img.set(x, y, 0xffffff);
            }
        }
        for x in 0..100 {
            img.set(x, 50, 0xc03030 + (x as u32 % 8));
        }
        let d = img.dominant();
        assert!(colors_match(d.color, 0xc03030, 4), "{}", hex(d.color));
        assert!(d.share > 0.85 && d.share < 0.92, "{}", d.share);
        assert!((img.share_near(0xc03030, 8) - 0.91).abs() < 1e-9);
        assert!(colors_match(0xc03030, 0xd02040, 16));
        assert!(!colors_match(0xc03030, 0xd02041, 16));
        assert!(!colors_match(0xc03030, 0x30a040, 16));
        assert_eq!(hex(0x30a040), "#30a040");
        assert_eq!(Image::new(4, 4, 0).dominant().color, 0);
        // Ties go to the lower bucket, deterministically.
        let mut two = Image::new(2, 1, 0x000000);
        two.set(1, 0, 0xffffff);
        assert_eq!(two.dominant().color, 0);
        assert_eq!(two.dominant().share, 0.5);
    }

    #[test]
    fn placeholder_and_differences() {
        let p = placeholder(640, 480);
        assert!(p.is_qemu_placeholder());
        assert_eq!(p.dominant().color, 0);
        assert!(!Image::new(640, 480, 0).is_qemu_placeholder(), "all black");
        let mut drawn = p.clone();
        drawn.set(0, 0, 0xc03030);
        assert!(!drawn.is_qemu_placeholder());
        assert!(!Image::new(8, 8, PLACEHOLDER_TEXT).is_qemu_placeholder());
        assert_eq!(p.differing_pixels(&p), Some(0));
        assert_eq!(p.differing_pixels(&drawn), Some(1));
        assert_eq!(p.differing_pixels(&Image::new(1, 1, 0)), None);
    }

    #[test]
    fn bands() {
        // 4 x 10 pixels, row y coloured y.
        let mut img = Image::new(4, 10, 0);
        for y in 0..10 {
            for x in 0..4 {
                img.set(x, y, y as u32);
            }
        }
        let b = img.band(1, 2).unwrap();
        assert_eq!((b.width, b.height), (4, 5));
        assert_eq!(b.get(0, 0), Some(5));
        assert_eq!(b.get(3, 4), Some(9));
        assert_eq!(img.band(0, 1).unwrap(), img);
        // 10 rows in 3 bands: 3 rows each, row 9 in none.
        assert_eq!(band_rows(10, 0, 3), Some((0, 3)));
        assert_eq!(band_rows(10, 2, 3), Some((6, 9)));
        assert_eq!(img.band(2, 3).unwrap().get(0, 2), Some(8));
        assert_eq!(band_rows(10, 3, 3), None);
        assert_eq!(band_rows(2, 0, 3), None);
        assert_eq!(band_rows(2, 0, 0), None);
        assert_eq!(img.band(0, 11), None);
    }
}
