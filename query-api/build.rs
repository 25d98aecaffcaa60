//! The dashboard page's charting library (uPlot, pinned in `assets/package-lock.json`) is
//! embedded from `assets/node_modules`; when it is not installed yet, `npm ci` installs it
//! (from the npm registry, or npm's cache). Nothing is bundled or transpiled.

use std::path::Path;
use std::process::Command;

fn main() {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    println!("cargo:rerun-if-changed=assets/package-lock.json");
    println!("cargo:rerun-if-changed=assets/node_modules/uplot/package.json");
    let wanted = [
        "node_modules/uplot/dist/uPlot.iife.min.js",
        "node_modules/uplot/dist/uPlot.min.css",
    ];
    if wanted.iter().all(|f| assets.join(f).is_file()) {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(&assets)
        .status();
    match status {
        Ok(s) if s.success() && wanted.iter().all(|f| assets.join(f).is_file()) => {}
        other => panic!(
            "the dashboard's charting library is missing and `npm ci` in {} failed ({other:?}); \
             run it there by hand (Node.js and the npm registry are needed once)",
            assets.display()
        ),
    }
}
