#!/usr/bin/env python3
"""Compare the 5-point anchor rule (stages/face/src/align.rs) with anchors from MediaPipe's
468-point face mesh, face by face (measurement for the face README; not a test).

    anchor_compare.py MESH.onnx TRACKS.json

TRACKS.json: a list of {"image": PATH, "label": NAME, "bbox": [x1, y1, x2, y2],
"landmarks": [[x, y] x 5]} (RetinaFace detections, e.g. from `lipsync-face track`).
Needs numpy, opencv-python-headless and onnxruntime.

Anchors from the mesh (correspondence to the reference's InsightFace 106 means, by
anatomy): each eyebrow = mean of the 10 mesh points of its contour (upper and lower arc),
the nose = mean of lower bridge (195), both alar wings (129, 358) and tip (1).
"""
import json
import sys

import cv2
import numpy as np
import onnxruntime as ort

BROW_IMG_LEFT = [70, 63, 105, 66, 107, 46, 53, 52, 65, 55]
BROW_IMG_RIGHT = [300, 293, 334, 296, 336, 276, 283, 282, 295, 285]
NOSE = [195, 129, 358, 1]
EYE_CORNERS = (33, 263)
BROW_OUT, BROW_UP, NOSE_T = 0.035, 0.26, 0.75
TEMPLATE = np.array([[17, 20], [58, 20], [37.5, 40]]) * 2.8  # 256 px profile, crop 210x280


def five_point(el, er, tip):
    d = np.linalg.norm(er - el)
    u = (er - el) / d
    v = np.array([-u[1], u[0]])
    m = (el + er) / 2
    return np.array([el - BROW_OUT * d * u - BROW_UP * d * v,
                     er + BROW_OUT * d * u - BROW_UP * d * v,
                     m + NOSE_T * (tip - m)])


def mesh_run(sess, img, centre, side, angle):
    """Crop a side x side square around centre rotated by angle to 192 px, run, map back."""
    s = 192.0 / side
    c, sn = np.cos(angle), np.sin(angle)
    # frame -> crop: rotate by -angle about centre, scale, move to crop centre
    m = np.array([[c * s, sn * s, 0], [-sn * s, c * s, 0]])
    m[:, 2] = np.array([96, 96]) - m[:, :2] @ centre
    crop = cv2.warpAffine(img, m, (192, 192), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    x = (crop.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    lm, flag = sess.run(None, {"input": x})
    pts = lm.reshape(-1, 3)[:, :2]
    inv = cv2.invertAffineTransform(m)
    return pts @ inv[:, :2].T + inv[:, 2], float(1 / (1 + np.exp(-flag.ravel()[0])))


def mesh_points(sess, img, bbox, lms):
    el, er = np.array(lms[0]), np.array(lms[1])
    angle = np.arctan2(er[1] - el[1], er[0] - el[0])
    centre = np.array([(bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2])
    side = 1.5 * max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    pts, flag = mesh_run(sess, img, centre, side, angle)
    for _ in range(2):  # MediaPipe's own re-crop from the landmarks
        a, b = pts[EYE_CORNERS[0]], pts[EYE_CORNERS[1]]
        angle = np.arctan2(b[1] - a[1], b[0] - a[0])
        lo, hi = pts.min(0), pts.max(0)
        centre = (lo + hi) / 2
        side = 1.5 * max(hi - lo)
        pts, flag = mesh_run(sess, img, centre, side, angle)
    return pts, flag


def similarity(src, dst):
    """The reference's transformation_from_points: frame -> crop."""
    c1, c2 = src.mean(0), dst.mean(0)
    s1, s2 = (src - c1).std(), (dst - c2).std()
    a, b = (src - c1) / s1, (dst - c2) / s2
    u, _, vt = np.linalg.svd(a.T @ b)
    r = (u @ vt).T
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = (u @ vt).T
    sr = s2 / s1 * r
    return np.hstack([sr, (c2 - sr @ c1)[:, None]])


def main(mesh_path, tracks_path):
    sess = ort.InferenceSession(mesh_path, providers=["CPUExecutionProvider"])
    rows = []
    for t in json.load(open(tracks_path)):
        img = cv2.cvtColor(cv2.imread(t["image"]), cv2.COLOR_BGR2RGB)
        lms = np.array(t["landmarks"], dtype=np.float64)
        pts, flag = mesh_points(sess, img, t["bbox"], lms)
        dense = np.array([pts[BROW_IMG_LEFT].mean(0), pts[BROW_IMG_RIGHT].mean(0),
                          pts[NOSE].mean(0)])
        five = five_point(lms[0], lms[1], lms[2])
        iod = np.linalg.norm(lms[1] - lms[0])
        u = (lms[1] - lms[0]) / iod
        v = np.array([-u[1], u[0]])
        err = five - dense
        along = err @ u / iod * 100
        down = err @ v / iod * 100
        # Where the crop lands: crop corners of the 5-point affine, mapped into the crop of
        # the dense affine, in 256 px model pixels.
        m5, md = similarity(five, TEMPLATE), similarity(dense, TEMPLATE)
        corners = np.array([[0, 0], [210, 0], [0, 280], [210, 280], [105, 140]], float)
        inv5 = cv2.invertAffineTransform(m5)
        frame_pts = corners @ inv5[:, :2].T + inv5[:, 2]
        in_dense = frame_pts @ md[:, :2].T + md[:, 2]
        shift = np.linalg.norm(in_dense - corners, axis=1) * 256 / 210
        scale = np.sqrt(abs(np.linalg.det(m5[:, :2])) / abs(np.linalg.det(md[:, :2])))
        rows.append((t["label"], iod, flag, dense, five, along, down, shift.max(), scale))
    print("| face | IOD px | mesh flag | brow L (along, down) % IOD | brow R | nose | "
          "crop shift (max corner, 256 px) | crop scale 5-pt / mesh |")
    print("|---|---|---|---|---|---|---|---|")
    for label, iod, flag, dense, five, along, down, shift, scale in rows:
        cells = ["%+.1f, %+.1f" % (along[k], down[k]) for k in range(3)]
        print("| %s | %.0f | %.2f | %s | %s | %s | %.1f px | %.3f |" % (
            label, iod, flag, cells[0], cells[1], cells[2], shift, scale))
    err = np.array([np.hypot(r[5], r[6]) for r in rows])  # (faces, 3)
    print("\nmean |5-point - mesh| per anchor (%% IOD): brow L %.1f, brow R %.1f, nose %.1f; "
          "max %.1f; crop shift mean %.1f px, max %.1f px (256 px crop)" % (
              *err.mean(0), err.max(), np.mean([r[7] for r in rows]),
              np.max([r[7] for r in rows])))
    for label, iod, flag, dense, five, *_ in rows:
        print("%s: mesh anchors %s, 5-point anchors %s" % (
            label, np.round(dense, 1).tolist(), np.round(five, 1).tolist()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
