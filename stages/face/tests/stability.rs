//! Stability on a known rigid motion: the test portrait (scikit-image's `astronaut.png`)
//! panned by a sub-pixel step and zoomed at once. Detector errors that stay the same on
//! every frame (a landmark model's bias for this face) do not move the crop; what changes
//! from frame to frame is jitter, which the temporal layers would read as motion. So after
//! removing each point's constant offset (its mean error in face units over the clip),
//! every landmark and every alignment anchor must stay within 5 % of the inter-ocular
//! distance on every frame, and the crop affine composed with the known motion (which
//! would be constant for a perfect tracker) must move smoothly.

mod common;

use common::{Place, geometry, render, settings};
use lipsync_face::align::anchors;
use lipsync_face::detect::Layout;
use lipsync_face::pipeline::track_file;

const FRAMES: usize = 24;

/// Pan 2.7 px per frame to the right and 0.9 px down while the face grows from 1.1x to
/// 1.56x (2 % per frame) around its moving centre.
fn motion(i: usize) -> Place {
    let s = 1.1 * 1.015f64.powi(i as i32);
    let (cx, cy) = (380.0 + 2.7 * i as f64, 250.0 + 0.9 * i as f64);
    let (fx, fy) = (225.5, 118.5);
    Place::at(s, cx - s * fx, cy - s * fy)
}

fn to_portrait(pl: &Place, p: [f64; 2]) -> [f64; 2] {
    // Inverse of Place::map for an unrotated placement.
    [
        (p[0] + 0.5 - pl.tx) / pl.s - 0.5,
        (p[1] + 0.5 - pl.ty) / pl.s - 0.5,
    ]
}

#[test]
#[ignore = "fails: RetinaFace mobilenet0.25 eye points jitter up to 6 % of the \
            inter-ocular distance on this clip (issue 14; stages/face/README.md)"]
fn five_point_anchors_follow_a_known_pan_and_zoom() {
    follows_a_known_pan_and_zoom("five-point");
}

#[test]
fn mesh_anchors_follow_a_known_pan_and_zoom() {
    follows_a_known_pan_and_zoom("mesh");
}

fn follows_a_known_pan_and_zoom(anchor_mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let v = render(dir.path(), "panzoom.mp4", 960, 540, FRAMES, |i| {
        Some(motion(i))
    });
    let s = settings(|c| c.anchors = anchor_mode.into());
    let layout = if anchor_mode == "mesh" {
        Layout::FiveMesh
    } else {
        Layout::Five
    };
    let mut det = s.build_detector().expect("detector loads");
    let t = track_file(&v, det.as_mut(), &geometry("tiny"), &s.track, &mut |_| {
        Ok(())
    })
    .unwrap();
    assert_eq!(t.frames.len(), FRAMES);

    // Every point of every frame expressed in portrait coordinates (the motion undone),
    // divided by the portrait's inter-ocular distance: a perfect tracker gives the same
    // values on every frame.
    let mut lm: Vec<Vec<[f64; 2]>> = Vec::new();
    let mut an: Vec<Vec<[f64; 2]>> = Vec::new();
    for (i, f) in t.frames.iter().enumerate() {
        assert!(f.present && !f.interpolated, "frame {i}: face detected");
        let pl = motion(i);
        let back = |q: [f64; 2]| to_portrait(&pl, q);
        lm.push(
            f.landmarks
                .iter()
                .take(3)
                .map(|q| back([f64::from(q[0]), f64::from(q[1])]))
                .collect(),
        );
        let a = anchors(layout, &f.landmarks).expect("anchors");
        an.push(a.iter().map(|&q| back(q)).collect());
    }
    let iod = {
        let e = &lm[0];
        ((e[1][0] - e[0][0]).powi(2) + (e[1][1] - e[0][1]).powi(2)).sqrt()
    };
    let mut worst = 0.0f64;
    let mut report = String::new();
    for (what, pts, names) in [
        ("landmark", &lm, ["left eye", "right eye", "nose tip"]),
        ("anchor", &an, ["left brow", "right brow", "nose"]),
    ] {
        // The mesh replaces only the anchors; its 5 detector points stay RetinaFace's.
        if anchor_mode == "mesh" && what == "landmark" {
            continue;
        }
        for (k, name) in names.iter().enumerate() {
            let mean = [0, 1].map(|c| pts.iter().map(|p| p[k][c]).sum::<f64>() / FRAMES as f64);
            for (i, p) in pts.iter().enumerate() {
                let e = ((p[k][0] - mean[0]).powi(2) + (p[k][1] - mean[1]).powi(2)).sqrt() / iod;
                worst = worst.max(e);
                if e > 0.05 {
                    report.push_str(&format!(
                        "{what} {name} frame {i}: {:.1} % of the inter-ocular distance\n",
                        e * 100.0
                    ));
                }
            }
        }
    }
    eprintln!(
        "{anchor_mode}: worst landmark/anchor jitter {:.2} % IOD",
        worst * 100.0
    );

    // The crop follows the motion: where the true eye midpoint and nose land in the crop
    // box (256 px profile, crop 210x280) stays put up to the EMA lag, and moves by little
    // between neighbouring frames.
    let face_pts = [[225.0, 102.0], [223.0, 125.0]];
    let mut crop_pos: Vec<[f64; 2]> = Vec::new();
    for (i, f) in t.frames.iter().enumerate() {
        let a = f.affine.map(|row| row.map(f64::from));
        let mut acc = [0.0; 2];
        for p in face_pts {
            let q = motion(i).map(p);
            acc[0] += a[0][0] * q[0] + a[0][1] * q[1] + a[0][2];
            acc[1] += a[1][0] * q[0] + a[1][1] * q[1] + a[1][2];
        }
        crop_pos.push([acc[0] / 2.0, acc[1] / 2.0]);
    }
    let mean = [0, 1].map(|c| crop_pos.iter().map(|p| p[c]).sum::<f64>() / FRAMES as f64);
    let mut steps = Vec::new();
    let mut max_off = 0.0f64;
    for (i, p) in crop_pos.iter().enumerate() {
        let off = ((p[0] - mean[0]).powi(2) + (p[1] - mean[1]).powi(2)).sqrt();
        max_off = max_off.max(off);
        if i > 0 {
            let q = crop_pos[i - 1];
            steps.push(((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt());
        }
    }
    let max_step = steps.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "{anchor_mode} crop: face at most {max_off:.2} px from its mean crop position, max step between \
         frames {max_step:.2} px (crop box 210x280)"
    );
    assert!(report.is_empty(), "jitter above 5 %:\n{report}");
    assert!(
        max_off < 6.0,
        "the face drifts {max_off:.1} px from its mean crop position"
    );
    assert!(
        max_step < 3.0,
        "the crop jumps by {max_step:.1} px between neighbouring frames: {steps:?}"
    );
}
