//! A small line chart renderer (axes, ticks, grid, legend, a built-in 5x7 font) onto
//! an [`Image`], for the per-VM GPU utilization plot.

use crate::image::Image;

/// One line of the chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `0x00RRGGBB`.
    pub color: u32,
    /// Line width in pixels.
    pub width: u32,
    /// Points in data coordinates; `None` breaks the line (a gap).
    pub points: Vec<Option<(f64, f64)>>,
}

/// A chart to draw.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Above the plot area.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Left of the y axis (drawn above it).
    pub y_label: String,
    /// The y range (the x range comes from the data).
    pub y_range: (f64, f64),
    /// The lines.
    pub series: Vec<Series>,
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 480;
const LEFT: i64 = 64;
const RIGHT: i64 = 170;
const TOP: i64 = 44;
const BOTTOM: i64 = 56;
const WHITE: u32 = 0xffffff;
const BLACK: u32 = 0x000000;
const GRID: u32 = 0xe0e0e0;

/// Rows of a 5x7 glyph (bit 4 is the leftmost column); lower case is drawn as upper
/// case and unknown characters as `?`.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        'A' => [0x0e, 0x11, 0x11, 0x11, 0x1f, 0x11, 0x11],
        'B' => [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e],
        'C' => [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e],
        'D' => [0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c],
        'E' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f],
        'F' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10],
        'G' => [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f],
        'H' => [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'I' => [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f],
        'M' => [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'P' => [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10],
        'Q' => [0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d],
        'R' => [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11],
        'S' => [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e],
        'T' => [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a],
        'X' => [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0a, 0x04, 0x04, 0x04],
        'Z' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0c, 0x0c],
        ',' => [0, 0, 0, 0, 0x0c, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1f, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1f, 0x04, 0x04, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        ':' => [0, 0x0c, 0x0c, 0, 0x0c, 0x0c, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1f],
        '=' => [0, 0, 0x1f, 0, 0x1f, 0, 0],
        '#' => [0x0a, 0x0a, 0x1f, 0x0a, 0x1f, 0x0a, 0x0a],
        _ => [0x0e, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

/// Width in pixels of `text` at `scale` (6 columns per character, the last spacing
/// column dropped).
pub fn text_width(text: &str, scale: u32) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * 6 - 1) * i64::from(scale)
    }
}

/// Draws `text` with its top-left corner at (x, y).
pub fn draw_text(img: &mut Image, x: i64, y: i64, text: &str, scale: u32, color: u32) {
    let s = i64::from(scale);
    for (i, c) in text.chars().enumerate() {
        let ox = x + i as i64 * 6 * s;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..5 {
                if bits >> (4 - col) & 1 == 1 {
                    fill_rect(img, ox + col * s, y + row as i64 * s, s, s, color);
                }
            }
        }
    }
}

/// Fills a `w` x `h` rectangle with its top-left corner at (x, y).
pub fn fill_rect(img: &mut Image, x: i64, y: i64, w: i64, h: i64, color: u32) {
    for yy in y..y + h {
        for xx in x..x + w {
            img.set(xx, yy, color);
        }
    }
}

/// A line from (x0, y0) to (x1, y1), `width` pixels thick (a square pen).
pub fn draw_line(
    img: &mut Image,
    (x0, y0): (i64, i64),
    (x1, y1): (i64, i64),
    width: u32,
    color: u32,
) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    let w = i64::from(width.max(1));
    let off = (w - 1) / 2;
    loop {
        fill_rect(img, x - off, y - off, w, w, color);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Tick positions covering `[lo, hi]` with a 1/2/5 x 10^k step, about `target` of them.
pub fn ticks(lo: f64, hi: f64, target: u32) -> (f64, Vec<f64>) {
    let span = (hi - lo).abs().max(1e-9);
    let raw = span / f64::from(target.max(1));
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * 0.999)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut k = 0;
    loop {
        let v = first + f64::from(k) * step;
        if v > hi + step * 1e-6 || k > 1000 {
            break;
        }
        // Avoid "-0".
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        k += 1;
    }
    (step, out)
}

/// A tick label: as many decimals as the step needs.
pub fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

impl Chart {
    /// Renders the chart (960x480, white background).
    pub fn render(&self) -> Image {
        let mut img = Image::new(WIDTH, HEIGHT, WHITE);
        let (px0, px1) = (LEFT, i64::from(WIDTH) - RIGHT);
        let (py0, py1) = (TOP, i64::from(HEIGHT) - BOTTOM);
        let pts = || self.series.iter().flat_map(|s| s.points.iter().flatten());
        let mut x_lo = pts().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let mut x_hi = pts().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        if !x_lo.is_finite() {
            (x_lo, x_hi) = (0.0, 1.0);
        }
        if x_hi - x_lo < 1e-9 {
            x_hi = x_lo + 1.0;
        }
        let (y_lo, mut y_hi) = self.y_range;
        if y_hi - y_lo < 1e-9 {
            y_hi = y_lo + 1.0;
        }
        let sx = |x: f64| px0 + ((x - x_lo) / (x_hi - x_lo) * (px1 - px0) as f64).round() as i64;
        let sy = |y: f64| py1 - ((y - y_lo) / (y_hi - y_lo) * (py1 - py0) as f64).round() as i64;

        // Grid and ticks.
        let (ystep, yt) = ticks(y_lo, y_hi, 5);
        for v in &yt {
            let y = sy(*v);
            draw_line(&mut img, (px0, y), (px1, y), 1, GRID);
            draw_line(&mut img, (px0 - 5, y), (px0, y), 1, BLACK);
            let l = tick_label(*v, ystep);
            draw_text(&mut img, px0 - 8 - text_width(&l, 1), y - 3, &l, 1, BLACK);
        }
        let (xstep, xt) = ticks(x_lo, x_hi, 8);
        for v in &xt {
            let x = sx(*v);
            draw_line(&mut img, (x, py0), (x, py1), 1, GRID);
            draw_line(&mut img, (x, py1), (x, py1 + 5), 1, BLACK);
            let l = tick_label(*v, xstep);
            draw_text(&mut img, x - text_width(&l, 1) / 2, py1 + 9, &l, 1, BLACK);
        }
        // Axes.
        draw_line(&mut img, (px0, py0), (px0, py1), 1, BLACK);
        draw_line(&mut img, (px0, py1), (px1, py1), 1, BLACK);
        // Labels.
        let tw = text_width(&self.title, 2);
        draw_text(
            &mut img,
            (px0 + px1) / 2 - tw / 2,
            10,
            &self.title,
            2,
            BLACK,
        );
        let xw = text_width(&self.x_label, 1);
        draw_text(
            &mut img,
            (px0 + px1) / 2 - xw / 2,
            py1 + 26,
            &self.x_label,
            1,
            BLACK,
        );
        draw_text(&mut img, 8, py0 - 14, &self.y_label, 1, BLACK);

        // The lines.
        for s in &self.series {
            let mut prev: Option<(i64, i64)> = None;
            let mut alone = true;
            for p in &s.points {
                match p {
                    Some((x, y)) => {
                        let q = (sx(*x), sy(y.clamp(y_lo, y_hi)));
                        if let Some(pp) = prev {
                            draw_line(&mut img, pp, q, s.width, s.color);
                            alone = false;
                        }
                        prev = Some(q);
                    }
                    None => {
                        if let (Some(pp), true) = (prev, alone) {
                            fill_rect(&mut img, pp.0 - 2, pp.1 - 2, 5, 5, s.color);
                        }
                        prev = None;
                        alone = true;
                    }
                }
            }
            if let (Some(pp), true) = (prev, alone) {
                fill_rect(&mut img, pp.0 - 2, pp.1 - 2, 5, 5, s.color);
            }
        }

        // Legend.
        let lx = px1 + 16;
        for (i, s) in self.series.iter().enumerate() {
            let y = py0 + 4 + i as i64 * 16;
            if y + 10 > py1 {
                draw_text(&mut img, lx, y, "...", 1, BLACK);
                break;
            }
            fill_rect(&mut img, lx, y, 18, 8, s.color);
            let label: String = s.label.chars().take(20).collect();
            draw_text(&mut img, lx + 24, y, &label, 1, BLACK);
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps() {
        let (s, t) = ticks(0.0, 100.0, 5);
        assert_eq!(s, 20.0);
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let (s, t) = ticks(0.25, 4.75, 10);
        assert_eq!(s, 0.5);
        assert_eq!(t.first(), Some(&0.5));
        assert_eq!(t.last(), Some(&4.5));
        assert_eq!(tick_label(1.5, s), "1.5");
        assert_eq!(tick_label(40.0, 20.0), "40");
        let (s, _) = ticks(3.0, 3.0, 8);
        assert!(s > 0.0);
        assert_eq!(tick_label(0.05, 0.05), "0.05");
    }

    #[test]
    fn text_and_lines() {
        let mut img = Image::new(40, 20, WHITE);
        draw_text(&mut img, 1, 1, "1", 1, BLACK);
        // '1': row 0 is 0b00100 -> column 2.
        assert_eq!(img.get(3, 1), Some(BLACK));
        assert_eq!(img.get(1, 1), Some(WHITE));
        // Bottom row 0b01110 -> columns 1..=3.
        assert_eq!(img.get(2, 7), Some(BLACK));
        assert_eq!(img.get(4, 7), Some(BLACK));
        assert_eq!(img.get(5, 7), Some(WHITE));
        assert_eq!(text_width("ab", 1), 11);
        assert_eq!(text_width("", 2), 0);
        let mut img = Image::new(20, 20, WHITE);
        draw_line(&mut img, (0, 0), (19, 19), 1, BLACK);
        assert!((0..20).all(|i| img.get(i, i) == Some(BLACK)));
        assert_eq!(img.get(1, 0), Some(WHITE));
        draw_line(&mut img, (19, 0), (0, 0), 3, 0xff0000);
        assert_eq!(img.get(10, 1), Some(0xff0000));
        // Out-of-range drawing is clipped, not a panic.
        draw_line(&mut img, (-50, -50), (100, 100), 2, BLACK);
    }

    #[test]
    fn chart_draws_series_colours() {
        let chart = Chart {
            title: "t".into(),
            x_label: "time (s)".into(),
            y_label: "%".into(),
            y_range: (0.0, 100.0),
            series: vec![
                Series {
                    label: "vm0".into(),
                    color: 0xc03030,
                    width: 2,
                    points: vec![
                        Some((0.0, 50.0)),
                        Some((1.0, 50.0)),
                        None,
                        Some((2.0, 10.0)),
                    ],
                },
                Series {
                    label: "empty".into(),
                    color: 0x30a040,
                    width: 2,
                    points: vec![],
                },
            ],
        };
        let img = chart.render();
        assert_eq!((img.width, img.height), (WIDTH, HEIGHT));
        let n = img.colors().filter(|&c| c == 0xc03030).count();
        // A 2-pixel line across half the plot width, the lone point and the legend box.
        assert!(n > 700, "{n}");
        // The midpoint of the first segment is on the line (y = 50 %).
        let mid_y = (TOP + (i64::from(HEIGHT) - BOTTOM)) / 2;
        let mid_x = LEFT + (i64::from(WIDTH) - RIGHT - LEFT) / 4;
        assert_eq!(img.get(mid_x as u32, mid_y as u32), Some(0xc03030));
        // Empty series get only their legend box.
        assert_eq!(img.colors().filter(|&c| c == 0x30a040).count(), 18 * 8);
    }
}
