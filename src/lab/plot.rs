//! PNG charts for the evaluation report: line charts and grouped bar charts.
//!
//! Shapes are drawn with `plotters` on an in-memory RGB buffer; text is then
//! rasterised onto the same buffer with `ab_glyph` from a font compiled into the
//! binary (Ubuntu Light from `epaint_default_fonts`), and the result is encoded
//! with `image`. No system font is needed, and the same inputs give byte-identical
//! files on every machine.
//!
//! Text goes through our own small layout code rather than plotters' `ab_glyph`
//! feature because plotters 0.3.7 drops each glyph's left side bearing there,
//! which makes letters collide ("clean" reads as "dean").
//!
//! Colours follow the Okabe–Ito colour-blind-safe palette, and each series of a
//! line chart also gets its own marker shape, so charts stay readable in greyscale.
//! Legends sit in a column right of the plot and never cover data.
//!
//! Every value is an [`Estimate`] over training seeds: charts draw its mean, and
//! an error bar of ± its standard deviation where there is more than one seed.

use std::error::Error as StdError;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, GlyphId, PxScale, ScaleFont, point};
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::element::{DynElement, IntoDynElement};
use plotters::prelude::*;

pub use crate::lab::stats::Estimate;
use crate::{Error, Result};

/// One named series of (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, Estimate)>,
}

/// Default image size; a bar chart with many groups grows wider.
pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 540;

const TITLE_SIZE: f32 = 27.0;
const DESC_SIZE: f32 = 20.0;
const TICK_SIZE: f32 = 17.0;
const LEGEND_SIZE: f32 = 18.0;
/// Gap between the plot's right edge and the legend column.
const PLOT_RIGHT: u32 = 16;

/// Okabe & Ito (2008), ordered for contrast on white (yellow last).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(230, 159, 0),   // orange
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(0, 0, 0),       // black
    RGBColor(240, 228, 66),  // yellow
];
const MARKERS: usize = 5;
const INK: RGBColor = RGBColor(33, 33, 33);
const AXIS: RGBColor = RGBColor(90, 90, 90);
const GRID: RGBColor = RGBColor(225, 225, 225);
const LEGEND_BORDER: RGBColor = RGBColor(200, 200, 200);

type DrawResult<T = ()> = std::result::Result<T, Box<dyn StdError>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// A line chart with markers, one colour per series (a fixed, colour-blind-friendly
/// palette), error bars in the series' colour, legend, grid. The x range spans all
/// points; y is fixed to `y_range`. Non-finite points are skipped. Writes a 900×540 PNG to `path`, creating its parent
/// directories.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    y_range: Range<f64>,
    series: &[Series],
) -> Result<()> {
    check_range(&y_range)?;
    let font = font()?;
    let finite = |p: &&(f64, Estimate)| p.0.is_finite() && p.1.mean.is_finite();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(x, _) in series.iter().flat_map(|s| s.points.iter().filter(finite)) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    } else if lo == hi {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let (x_ticks, x_dec) = nice_ticks(lo..hi, 8);
    let pad = (hi - lo) * 0.03;
    let x_range = (lo - pad)..(hi + pad);
    let (y_ticks, y_dec) = nice_ticks(y_range.clone(), 10);
    let y_axis_w = y_axis_width(font, &y_ticks, y_dec);
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    let legend_w = legend_width(font, &names);
    let tick_h = line_height(font, TICK_SIZE);
    let x_axis_h = (8.0 + tick_h + 10.0 + line_height(font, DESC_SIZE) + 8.0) as u32;

    render(path, (WIDTH, HEIGHT), |root, text| {
        let plot = frame(root, text, title, &names, legend_w, true)?;
        let chart = ChartBuilder::on(&plot)
            .margin_top(8)
            .margin_right(PLOT_RIGHT)
            .x_label_area_size(x_axis_h)
            .y_label_area_size(y_axis_w)
            .build_cartesian_2d(x_range.clone(), y_range.clone())?;
        let (px, py) = chart.plotting_area().get_pixel_range();
        for &x in &x_ticks {
            let (cx, _) = chart.backend_coord(&(x, y_range.start));
            root.draw(&PathElement::new(vec![(cx, py.start), (cx, py.end)], GRID))?;
            root.draw(&PathElement::new(
                vec![(cx, py.end), (cx, py.end + 5)],
                AXIS,
            ))?;
            let label = Text::new(fmt_tick(x, x_dec), TICK_SIZE, INK);
            text.push(label.at(cx as f32, (py.end + 8) as f32, Align::Center, Align::Start));
        }
        y_grid(root, text, &chart, &y_ticks, y_dec)?;
        axes(root, &px, &py)?;
        for (i, s) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, Estimate)> = s.points.iter().filter(finite).copied().collect();
            let means: Vec<(f64, f64)> = pts.iter().map(|(x, e)| (*x, e.mean)).collect();
            chart
                .plotting_area()
                .draw(&PathElement::new(means.clone(), color.stroke_width(2)))?;
            for (x, e) in &pts {
                error_bar(root, &chart, *x, e, 5, color)?;
            }
            for p in &means {
                root.draw(&marker(chart.backend_coord(p), i, color))?;
            }
        }
        let mid_x = (px.start + px.end) as f32 / 2.0;
        let x_label = fit(font, DESC_SIZE, x_label, (px.end - px.start + 40) as f32);
        let desc = Text::new(x_label, DESC_SIZE, INK);
        text.push(desc.at(
            mid_x,
            py.end as f32 + 8.0 + tick_h + 10.0,
            Align::Center,
            Align::Start,
        ));
        text.push(y_desc(font, y_label, &py));
        Ok(())
    })
}

/// Grouped bars: `groups` along x (e.g. corruption names), one bar per series in each
/// group (e.g. "clean model", "patched"), values in `y_range` (bars rise from
/// `y_range.start` to the mean, values outside are clipped, non-finite values leave a
/// gap) with a dark error bar; legend.
/// Each series must hold one value per group. The image is 900×540, wider when there
/// are many groups; long group names wrap onto several lines under their group
/// (after '_' or '-', or at spaces), and a single word too long for its slot is cut
/// with '…'.
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    y_range: Range<f64>,
    groups: &[String],
    series: &[(String, Vec<Estimate>)],
) -> Result<()> {
    check_range(&y_range)?;
    if let Some((name, v)) = series.iter().find(|(_, v)| v.len() != groups.len()) {
        return Err(Error::InvalidArgument(format!(
            "bar chart series {name:?} has {} values for {} groups",
            v.len(),
            groups.len()
        )));
    }
    let font = font()?;
    let n = groups.len().max(1);
    let k = series.len().max(1);
    // Each group gets room for its widest word and at least ~18 px per bar.
    let widest_word = groups
        .iter()
        .flat_map(|g| split_words(g))
        .map(|w| text_width(font, TICK_SIZE, &w))
        .fold(0.0, f32::max);
    let min_slot = (k as u32 * 18 + 24).max(64);
    let slot = (widest_word.ceil() as u32 + 16).clamp(min_slot, min_slot.max(170));
    let labels: Vec<Vec<String>> = groups
        .iter()
        .map(|g| wrap(font, TICK_SIZE, g, (slot - 8) as f32))
        .collect();
    let lines = labels.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let tick_h = line_height(font, TICK_SIZE);
    let x_axis_h = (10.0 + tick_h * lines as f32 + 10.0) as u32;
    let names: Vec<&str> = series.iter().map(|(s, _)| s.as_str()).collect();
    let legend_w = legend_width(font, &names);
    let (y_ticks, y_dec) = nice_ticks(y_range.clone(), 10);
    let y_axis_w = y_axis_width(font, &y_ticks, y_dec);
    let width = WIDTH.max(8 + y_axis_w + slot * n as u32 + PLOT_RIGHT + legend_w);
    let height = HEIGHT + (tick_h * (lines - 1) as f32) as u32;
    let base = y_range.start;

    render(path, (width, height), |root, text| {
        let plot = frame(root, text, title, &names, legend_w, false)?;
        let chart = ChartBuilder::on(&plot)
            .margin_top(8)
            .margin_right(PLOT_RIGHT)
            .x_label_area_size(x_axis_h)
            .y_label_area_size(y_axis_w)
            .build_cartesian_2d(0.0..n as f64, y_range.clone())?;
        let (px, py) = chart.plotting_area().get_pixel_range();
        y_grid(root, text, &chart, &y_ticks, y_dec)?;
        let bw = 0.8 / k as f64;
        for (s, (_, values)) in series.iter().enumerate() {
            let color = PALETTE[s % PALETTE.len()];
            for (g, e) in values
                .iter()
                .enumerate()
                .filter(|(_, e)| e.mean.is_finite())
            {
                let x0 = g as f64 + 0.1 + s as f64 * bw;
                let top = e.mean.clamp(y_range.start, y_range.end);
                let (l, t) = chart.backend_coord(&(x0 + bw * 0.06, top));
                let (r, b) = chart.backend_coord(&(x0 + bw * 0.94, base));
                root.draw(&Rectangle::new([(l, t), (r.max(l + 1), b)], color.filled()))?;
                let cap = ((r - l) / 4).clamp(2, 6);
                error_bar(root, &chart, x0 + bw / 2.0, e, cap, INK)?;
            }
        }
        axes(root, &px, &py)?;
        for (g, lines) in labels.iter().enumerate() {
            let (cx, _) = chart.backend_coord(&(g as f64 + 0.5, base));
            for (j, line) in lines.iter().enumerate() {
                let y = py.end as f32 + 10.0 + tick_h * j as f32;
                let label = Text::new(line.clone(), TICK_SIZE, INK);
                text.push(label.at(cx as f32, y, Align::Center, Align::Start));
            }
        }
        text.push(y_desc(font, y_label, &py));
        Ok(())
    })
}

fn check_range(r: &Range<f64>) -> Result<()> {
    if r.start.is_finite() && r.end.is_finite() && r.start < r.end {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "chart y range {r:?} is empty or not finite"
        )))
    }
}

/// The embedded font, parsed once per process.
fn font() -> Result<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT).ok())
        .as_ref()
        .ok_or_else(|| Error::Internal("the embedded chart font does not parse".into()))
}

/// Draws shapes with plotters on a white RGB canvas of `size`, then the queued
/// text, encodes the canvas as PNG and writes it atomically.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area, &mut Vec<Text>) -> DrawResult,
) -> Result<()> {
    let font = font()?;
    let (w, h) = size;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    let mut texts = Vec::new();
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        draw(&root, &mut texts)
            .and_then(|()| Ok(root.present()?))
            .map_err(|e| Error::Internal(format!("cannot draw chart {}: {e}", path.display())))?;
    }
    for t in &texts {
        t.draw(font, &mut buf, size);
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &buf,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Internal(format!("cannot encode chart {}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, &png)
}

/// Queues the title and draws the legend column; returns the area left for the plot.
fn frame<'a>(
    root: &Area<'a>,
    text: &mut Vec<Text>,
    title: &str,
    names: &[&str],
    legend_w: u32,
    markers: bool,
) -> DrawResult<Area<'a>> {
    let font = font()?;
    let (w, _) = root.dim_in_pixel();
    let title_h = line_height(font, TITLE_SIZE);
    let t = Text::new(
        fit(font, TITLE_SIZE, title, w as f32 - 24.0),
        TITLE_SIZE,
        INK,
    );
    text.push(t.at(w as f32 / 2.0, 12.0, Align::Center, Align::Start));
    let body = root.margin(title_h as u32 + 20, 8, 8, 0);
    if names.is_empty() {
        return Ok(body);
    }
    let (plot, legend) = body.split_horizontally(body.dim_in_pixel().0 - legend_w);
    let (lx, ly) = (legend.get_base_pixel().0, legend.get_base_pixel().1 + 8);
    let row = line_height(font, LEGEND_SIZE) as i32 + 8;
    let (lw, lh) = (legend_w as i32 - 12, row * names.len() as i32 + 12);
    root.draw(&Rectangle::new(
        [(lx, ly), (lx + lw, ly + lh)],
        LEGEND_BORDER,
    ))?;
    for (i, name) in names.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let y = ly + 6 + row * i as i32 + row / 2;
        if markers {
            let stroke = color.stroke_width(2);
            root.draw(&PathElement::new(vec![(lx + 10, y), (lx + 42, y)], stroke))?;
            root.draw(&marker((lx + 26, y), i, color))?;
        } else {
            root.draw(&Rectangle::new(
                [(lx + 12, y - 7), (lx + 40, y + 7)],
                color.filled(),
            ))?;
        }
        let name = fit(font, LEGEND_SIZE, name, (lw - 52 - 8) as f32);
        let label = Text::new(name, LEGEND_SIZE, INK);
        text.push(label.at((lx + 52) as f32, y as f32, Align::Start, Align::Center));
    }
    Ok(plot)
}

/// Horizontal grid lines, tick marks and tick labels for the y axis.
fn y_grid<X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    root: &Area,
    text: &mut Vec<Text>,
    chart: &ChartContext<BitMapBackend, Cartesian2d<X, Y>>,
    ticks: &[f64],
    decimals: usize,
) -> DrawResult {
    let (px, _) = chart.plotting_area().get_pixel_range();
    let x0 = chart.x_range().start;
    for &y in ticks {
        let (_, cy) = chart.backend_coord(&(x0, y));
        root.draw(&PathElement::new(vec![(px.start, cy), (px.end, cy)], GRID))?;
        root.draw(&PathElement::new(
            vec![(px.start - 5, cy), (px.start, cy)],
            AXIS,
        ))?;
        let label = Text::new(fmt_tick(y, decimals), TICK_SIZE, INK);
        text.push(label.at((px.start - 9) as f32, cy as f32, Align::End, Align::Center));
    }
    Ok(())
}

/// A vertical bar from mean − sd to mean + sd at `x` (clipped to the y range),
/// capped `cap` pixels either side; nothing when there is no spread.
fn error_bar<X: Ranged<ValueType = f64>>(
    root: &Area,
    chart: &ChartContext<BitMapBackend, Cartesian2d<X, RangedCoordf64>>,
    x: f64,
    e: &Estimate,
    cap: i32,
    color: RGBColor,
) -> DrawResult {
    if !(e.sd > 0.0 && e.sd.is_finite()) {
        return Ok(());
    }
    let y = chart.y_range();
    let clip = |v: f64| v.clamp(y.start, y.end);
    let (cx, hi) = chart.backend_coord(&(x, clip(e.mean + e.sd)));
    let (_, lo) = chart.backend_coord(&(x, clip(e.mean - e.sd)));
    let stroke = color.stroke_width(2);
    root.draw(&PathElement::new(vec![(cx, hi), (cx, lo)], stroke))?;
    for at in [hi, lo] {
        root.draw(&PathElement::new(
            vec![(cx - cap, at), (cx + cap, at)],
            stroke,
        ))?;
    }
    Ok(())
}

/// The left and bottom axis lines of the plot.
fn axes(root: &Area, px: &Range<i32>, py: &Range<i32>) -> DrawResult {
    let corner = (px.start, py.end);
    root.draw(&PathElement::new(vec![(px.start, py.start), corner], AXIS))?;
    root.draw(&PathElement::new(vec![corner, (px.end, py.end)], AXIS))?;
    Ok(())
}

/// The y axis description, rotated to read bottom to top, centred on the plot.
fn y_desc(font: &FontRef, label: &str, py: &Range<i32>) -> Text {
    let label = fit(font, DESC_SIZE, label, (py.end - py.start + 40) as f32);
    let mut t = Text::new(label, DESC_SIZE, INK);
    t.vertical = true;
    let mid = (py.start + py.end) as f32 / 2.0;
    t.at(10.0, mid, Align::Center, Align::Start)
}

/// Width of the legend column for these series names (0 without series).
fn legend_width(font: &FontRef, names: &[&str]) -> u32 {
    if names.is_empty() {
        return 0;
    }
    let widest = names
        .iter()
        .map(|n| text_width(font, LEGEND_SIZE, n))
        .fold(0.0, f32::max);
    (widest.ceil() as u32 + 52 + 14 + 12).clamp(120, 360)
}

/// The i-th marker shape (circle, triangle, square, diamond, cross) at a pixel.
fn marker<'a, DB: DrawingBackend + 'a>(
    c: (i32, i32),
    i: usize,
    color: RGBColor,
) -> DynElement<'a, DB, (i32, i32)> {
    let fill = color.filled();
    let at = EmptyElement::at(c);
    match (i / PALETTE.len() + i) % MARKERS {
        0 => (at + Circle::new((0, 0), 5, fill)).into_dyn(),
        1 => (at + Polygon::new(vec![(0, -7), (6, 4), (-6, 4)], fill)).into_dyn(),
        2 => (at + Rectangle::new([(-5, -5), (5, 5)], fill)).into_dyn(),
        3 => (at + Polygon::new(vec![(0, -7), (6, 0), (0, 7), (-6, 0)], fill)).into_dyn(),
        _ => (at
            + PathElement::new(vec![(-5, -5), (5, 5)], color.stroke_width(3))
            + PathElement::new(vec![(-5, 5), (5, -5)], color.stroke_width(3)))
        .into_dyn(),
    }
}

/// About `target` round tick values (steps of 1, 2 or 5 × 10ⁿ) inside `r`, and the
/// number of decimals their labels need.
fn nice_ticks(r: Range<f64>, target: usize) -> (Vec<f64>, usize) {
    let raw = (r.end - r.start) / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = match raw / mag {
        n if n <= 1.0 => mag,
        n if n <= 2.0 => 2.0 * mag,
        n if n <= 5.0 => 5.0 * mag,
        _ => 10.0 * mag,
    };
    let decimals = (-step.log10().floor()).clamp(0.0, 9.0) as usize;
    let first = (r.start / step - 1e-9).ceil() as i64;
    let last = (r.end / step + 1e-9).floor() as i64;
    let ticks = (first..=last).map(|i| i as f64 * step).collect();
    (ticks, decimals)
}

/// A tick label: fixed decimals, a typographic minus, and no "-0.0".
fn fmt_tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        Some(rest) => format!("\u{2212}{rest}"),
        None => s,
    }
}

/// Room left of the plot for the rotated y description, the widest tick label
/// and the tick marks.
fn y_axis_width(font: &FontRef, ticks: &[f64], decimals: usize) -> u32 {
    let widest = ticks
        .iter()
        .map(|&t| text_width(font, TICK_SIZE, &fmt_tick(t, decimals)))
        .fold(0.0, f32::max);
    (10.0 + line_height(font, DESC_SIZE) + 10.0 + widest + 9.0).ceil() as u32
}

/// `s` as is when it fits in `max_w` pixels, else cut and ended with '…'.
fn fit(font: &FontRef, size: f32, s: &str, max_w: f32) -> String {
    if text_width(font, size, s) <= max_w {
        return s.to_string();
    }
    let mut chars: Vec<char> = s.chars().collect();
    let cut = |c: &[char]| format!("{}…", c.iter().collect::<String>());
    while chars.len() > 1 && text_width(font, size, &cut(&chars)) > max_w {
        chars.pop();
    }
    cut(&chars)
}

/// Splits a group name into pieces it may wrap between: after '_' / '-' (kept)
/// and at spaces (dropped).
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            ' ' => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            '_' | '-' => {
                cur.push(c);
                words.push(std::mem::take(&mut cur));
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// Greedy line wrapping of `s` to `max_w` pixels; a word longer than a line is cut
/// and ends in '…'.
fn wrap(font: &FontRef, size: f32, s: &str, max_w: f32) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in split_words(s) {
        let joined = if cur.is_empty() || cur.ends_with(['_', '-']) {
            format!("{cur}{word}")
        } else {
            format!("{cur} {word}")
        };
        if cur.is_empty() || text_width(font, size, &joined) <= max_w {
            cur = joined;
        } else {
            lines.push(std::mem::replace(&mut cur, word));
        }
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines.iter().map(|l| fit(font, size, l, max_w)).collect()
}

/// Where a text sits relative to its anchor point, along one direction.
#[derive(Debug, Clone, Copy)]
enum Align {
    Start,
    Center,
    End,
}

/// One line of text, queued while plotters draws and rasterised afterwards.
#[derive(Debug, Clone)]
struct Text {
    s: String,
    size: f32,
    color: RGBColor,
    /// Anchor point in pixels.
    x: f32,
    y: f32,
    /// Alignment along the text and across it (Start = top of the capitals,
    /// Center = middle of the capitals, End = baseline).
    along: Align,
    across: Align,
    /// Rotated 90° anticlockwise (reads bottom to top).
    vertical: bool,
}

impl Text {
    fn new(s: String, size: f32, color: RGBColor) -> Self {
        Text {
            s,
            size,
            color,
            x: 0.0,
            y: 0.0,
            along: Align::Start,
            across: Align::Start,
            vertical: false,
        }
    }

    fn at(mut self, x: f32, y: f32, along: Align, across: Align) -> Self {
        (self.x, self.y, self.along, self.across) = (x, y, along, across);
        self
    }

    /// Rasterises the text onto an RGB buffer of `size`, blending by coverage.
    fn draw(&self, font: &FontRef, buf: &mut [u8], (w, h): (u32, u32)) {
        let scale = PxScale::from(self.size);
        let sf = font.as_scaled(scale);
        let width = text_width(font, self.size, &self.s);
        let cap = cap_height(font, self.size);
        // Text-local frame: u along the text from its start, v down from the baseline.
        let u0 = match self.along {
            Align::Start => 0.0,
            Align::Center => -width / 2.0,
            Align::End => -width,
        };
        let v0 = match self.across {
            Align::Start => cap,
            Align::Center => cap / 2.0,
            Align::End => 0.0,
        };
        let [r, g, b] = [self.color.0, self.color.1, self.color.2].map(f32::from);
        let (ax, ay) = (self.x.round() as i32, self.y.round() as i32);
        let (ou, ov) = (u0.round() as i32, v0.round() as i32);
        let mut caret = 0.0;
        let mut prev: Option<GlyphId> = None;
        for c in self.s.chars() {
            let id = sf.glyph_id(c);
            if let Some(p) = prev {
                caret += sf.kern(p, id);
            }
            prev = Some(id);
            let glyph = id.with_scale_and_position(scale, point(caret, 0.0));
            caret += sf.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            // Whole-pixel offsets: rounding each glyph row separately would skip a
            // row where the offset crosses zero.
            let u_at = ou + bounds.min.x as i32;
            let v_at = ov + bounds.min.y as i32;
            outline.draw(|gx, gy, cov| {
                let (u, v) = (u_at + gx as i32, v_at + gy as i32);
                let (x, y) = if self.vertical {
                    (ax + v, ay - u)
                } else {
                    (ax + u, ay + v)
                };
                if x < 0 || y < 0 || x >= w as i32 || y >= h as i32 {
                    return;
                }
                let i = (y as usize * w as usize + x as usize) * 3;
                let a = cov.clamp(0.0, 1.0);
                for (px, ink) in buf[i..i + 3].iter_mut().zip([r, g, b]) {
                    *px = (f32::from(*px) * (1.0 - a) + ink * a).round() as u8;
                }
            });
        }
    }
}

/// Advance width of `s` in pixels, kerning included.
fn text_width(font: &FontRef, size: f32, s: &str) -> f32 {
    let sf = font.as_scaled(PxScale::from(size));
    let mut width = 0.0;
    let mut prev: Option<GlyphId> = None;
    for c in s.chars() {
        let id = sf.glyph_id(c);
        if let Some(p) = prev {
            width += sf.kern(p, id);
        }
        width += sf.h_advance(id);
        prev = Some(id);
    }
    width
}

/// Height of a capital letter above the baseline, in pixels.
fn cap_height(font: &FontRef, size: f32) -> f32 {
    let glyph = font.glyph_id('H').with_scale(PxScale::from(size));
    font.outline_glyph(glyph)
        .map(|o| -o.px_bounds().min.y)
        .unwrap_or(size * 0.7)
}

/// Distance between two lines of text of this size, in pixels.
fn line_height(font: &FontRef, size: f32) -> f32 {
    let sf = font.as_scaled(PxScale::from(size));
    (sf.ascent() - sf.descent() + sf.line_gap()).ceil()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three seeds' mean and standard deviation.
    fn est(mean: f64, sd: f64) -> Estimate {
        Estimate { mean, sd, n: 3 }
    }

    fn example_series() -> Vec<Series> {
        let sev: Vec<f64> = (0..=5).map(f64::from).collect();
        let curve = |a: f64, b: f64| {
            sev.iter()
                .map(|&s| (s, est(a - b * s * s.sqrt() / 11.2, 0.01 * s)))
                .collect()
        };
        vec![
            Series {
                name: "clean model".into(),
                points: curve(0.92, 0.55),
            },
            Series {
                name: "patched (RWS, α=1)".into(),
                points: curve(0.91, 0.22),
            },
            Series {
                name: "robust expert".into(),
                points: curve(0.88, 0.18),
            },
            Series {
                name: "patched (int8 signature)".into(),
                points: curve(0.905, 0.24),
            },
        ]
    }

    fn example_bars() -> (Vec<String>, Vec<(String, Vec<Estimate>)>) {
        let groups: Vec<String> = [
            "gaussian_noise",
            "shot_noise",
            "impulse_noise",
            "defocus_blur",
            "motion_blur",
            "contrast",
            "brightness",
            "fog",
            "pixelate",
            "jpeg_compression",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let clean: Vec<Estimate> = (0..10)
            .map(|i| est(0.35 + 0.05 * f64::from(i % 7), 0.02))
            .collect();
        let patched = clean
            .iter()
            .map(|e| est((e.mean + 0.3).min(0.95), 0.03))
            .collect();
        let expert = clean
            .iter()
            .map(|e| est((e.mean + 0.33).min(0.97), 0.0))
            .collect();
        let series = vec![
            ("clean model".to_string(), clean),
            ("patched".to_string(), patched),
            ("robust expert".to_string(), expert),
        ];
        (groups, series)
    }

    fn decode(path: &Path) -> image::RgbImage {
        let bytes = std::fs::read(path).unwrap();
        assert!(!bytes.is_empty());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8()
    }

    /// Count of dark (text-coloured) pixels in rows `rows`.
    fn dark_pixels(img: &image::RgbImage, rows: Range<u32>) -> usize {
        rows.flat_map(|y| (0..img.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count()
    }

    #[test]
    fn line_chart_writes_deterministic_png() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("nested/dir/line.png");
        let b = dir.path().join("line2.png");
        let s = example_series();
        let t = "Accuracy vs severity";
        line_chart(&a, t, "severity", "top-1 accuracy", 0.0..1.0, &s).unwrap();
        line_chart(&b, t, "severity", "top-1 accuracy", 0.0..1.0, &s).unwrap();
        let img = decode(&a);
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // Text really is drawn: the title rows hold dark pixels.
        let dark = dark_pixels(&img, 10..40);
        assert!(dark > 50, "title looks empty ({dark} dark pixels)");
    }

    #[test]
    fn line_chart_edge_cases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("edge.png");
        line_chart(&p, "empty", "x", "y", 0.0..1.0, &[]).unwrap();
        assert_eq!(decode(&p).dimensions(), (WIDTH, HEIGHT));
        let one = [Series {
            name: "one".into(),
            points: vec![(3.0, est(0.5, 0.1)), (f64::NAN, est(0.2, 0.0))],
        }];
        line_chart(&p, "one point", "x", "y", -1.0..1.0, &one).unwrap();
        assert_eq!(decode(&p).dimensions(), (WIDTH, HEIGHT));
        assert!(matches!(
            line_chart(&p, "bad", "x", "y", 1.0..1.0, &one),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn bar_chart_writes_deterministic_png() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("sub/bar.png");
        let b = dir.path().join("bar2.png");
        let (groups, series) = example_bars();
        let t = "Accuracy per corruption";
        bar_chart(&a, t, "top-1 accuracy", 0.0..1.0, &groups, &series).unwrap();
        bar_chart(&b, t, "top-1 accuracy", 0.0..1.0, &groups, &series).unwrap();
        let img = decode(&a);
        let (w, h) = img.dimensions();
        assert!(w >= WIDTH && h >= HEIGHT, "{w}x{h}");
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(dark_pixels(&img, 10..40) > 50);
        // A few short groups keep the default size.
        let short = vec!["fog".to_string(), "snow".to_string()];
        let s = vec![
            ("a".to_string(), vec![est(0.2, 0.05), est(0.4, 0.0)]),
            ("b".to_string(), vec![est(0.3, 2.0), est(f64::NAN, 0.1)]),
        ];
        bar_chart(&b, "short", "acc", 0.0..1.0, &short, &s).unwrap();
        assert_eq!(decode(&b).dimensions(), (WIDTH, HEIGHT));
        bar_chart(&b, "nothing", "acc", 0.0..1.0, &[], &[]).unwrap();
        assert_eq!(decode(&b).dimensions(), (WIDTH, HEIGHT));
        // A series with the wrong number of values is refused.
        let bad = vec![("a".to_string(), vec![est(0.2, 0.0)])];
        assert!(matches!(
            bar_chart(&b, "bad", "acc", 0.0..1.0, &short, &bad),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn error_bars_show_the_spread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.png");
        let groups = vec!["fog".to_string()];
        // Dark pixels below the title: the bar's error bar is drawn in ink.
        let bar_ink = |sd: f64| {
            let s = vec![("a".to_string(), vec![est(0.5, sd)])];
            bar_chart(&p, "t", "acc", 0.0..1.0, &groups, &s).unwrap();
            dark_pixels(&decode(&p), 60..HEIGHT - 60)
        };
        assert!(bar_ink(0.2) > bar_ink(0.0) + 40);
        // A line's error bars take its colour: count the blue pixels.
        let blue = |sd: f64| {
            let s = [Series {
                name: "a".into(),
                points: vec![(0.0, est(0.5, sd)), (1.0, est(0.6, sd))],
            }];
            line_chart(&p, "t", "x", "y", 0.0..1.0, &s).unwrap();
            let img = decode(&p);
            img.pixels().filter(|px| px.0 == [0, 114, 178]).count()
        };
        assert!(blue(0.2) > blue(0.0) + 80);
    }

    #[test]
    fn wrap_splits_long_names() {
        let font = font().unwrap();
        let lines = wrap(font, TICK_SIZE, "jpeg_compression", 100.0);
        assert_eq!(lines, vec!["jpeg_", "compression"]);
        assert_eq!(wrap(font, TICK_SIZE, "fog", 60.0), vec!["fog"]);
        assert_eq!(
            wrap(font, TICK_SIZE, "elastic transform", 100.0),
            vec!["elastic", "transform"]
        );
        let cut = wrap(font, TICK_SIZE, "supercalifragilistic", 50.0);
        assert!(cut[0].ends_with('…'), "{cut:?}");
        assert!(text_width(font, TICK_SIZE, &cut[0]) <= 50.0, "{cut:?}");
    }

    #[test]
    fn ticks_are_round() {
        let (t, d) = nice_ticks(0.0..1.0, 10);
        assert_eq!(d, 1);
        assert_eq!(t.len(), 11);
        assert_eq!(fmt_tick(t[3], d), "0.3");
        let (t, d) = nice_ticks(0.0..5.0, 10);
        assert_eq!((t.len(), d), (11, 1));
        let (t, d) = nice_ticks(0.0..50.0, 10);
        assert_eq!((t, d), ((0..=10).map(|i| f64::from(i) * 5.0).collect(), 0));
        assert_eq!(fmt_tick(-0.0001, 2), "0.00");
        assert_eq!(fmt_tick(-0.5, 1), "\u{2212}0.5");
    }

    /// Writes example charts to /tmp/plot_line.png and /tmp/plot_bar.png to look at:
    /// `cargo test --lib plot::tests::write_examples -- --ignored`
    #[test]
    #[ignore]
    fn write_examples() {
        let s = example_series();
        line_chart(
            Path::new("/tmp/plot_line.png"),
            "Top-1 accuracy vs corruption severity (gaussian_noise)",
            "severity",
            "top-1 accuracy",
            0.0..1.0,
            &s,
        )
        .unwrap();
        let (groups, series) = example_bars();
        bar_chart(
            Path::new("/tmp/plot_bar.png"),
            "Top-1 accuracy per corruption (severity 3)",
            "top-1 accuracy",
            0.0..1.0,
            &groups,
            &series,
        )
        .unwrap();
    }
}
