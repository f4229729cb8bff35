//! chart.png: throughput and p99 latency per target, side by side.
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::{coord::Shift, prelude::*};

use crate::report::Report;

/// Debian's fonts-dejavu-core (installed by `cargo xtask bench`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn draw(rep: &Report, path: &Path) -> Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt-get install fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let root = BitMapBackend::new(path, (1600, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(800);
    let tput: Vec<(&str, f64)> = rep
        .results
        .iter()
        .filter_map(|t| Some((t.name, t.throughput.first()?.wrk.rps)))
        .collect();
    bars(
        &left,
        "Throughput, valid token (req/s, higher is better)",
        &tput,
        0,
    )?;
    let p99: Vec<(&str, f64)> = rep
        .results
        .iter()
        .filter_map(|t| Some((t.name, t.latency.iter().find(|l| l.rate == 1000)?.p99_ms)))
        .collect();
    bars(
        &right,
        "p99 latency at 1,000 req/s (ms, lower is better)",
        &p99,
        3,
    )?;
    root.present()?;
    Ok(())
}

fn bars(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    data: &[(&str, f64)],
    decimals: usize,
) -> Result<()> {
    let max = data.iter().map(|d| d.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..data.len()).into_segmented(), 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(data.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => data.get(*i).map(|d| d.0.to_string()).unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 13))
        .y_label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(data.iter().enumerate().map(|(i, (name, v))| {
        let color = if name.starts_with("agent") {
            BLUE
        } else if *name == "direct" {
            GREEN
        } else {
            RED
        };
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            color.mix(0.6).filled(),
        );
        bar.set_margin(0, 0, 10, 10);
        bar
    }))?;
    chart.draw_series(data.iter().enumerate().map(|(i, (_, v))| {
        Text::new(
            format!("{v:.decimals$}"),
            (SegmentValue::CenterOf(i), *v + max * 0.02),
            ("sans-serif", 13),
        )
    }))?;
    Ok(())
}
