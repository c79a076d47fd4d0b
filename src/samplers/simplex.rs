//! OpenSimplex 3-D noise: Kurt Spencer's 2014 algorithm as the `opensimplex` Python package (0.4) implements
//! it, which RES4LYF's `SimplexNoiseGenerator` calls (`noise3array(arange(w), arange(h), arange(c))`). The
//! permutation from a 64-bit seed (an LCG with a Fisher-Yates draw), the 24 gradients of a skewed
//! rhombicuboctahedron, the stretch/squish constants, the three regions of the stretched cube and the
//! normalization by 103 carry over; the floating-point operations are in the package's order, so values agree to
//! the last bit or so (tests/samplers_noise.rs, golden file from scripts/golden/samplers_simplex.py).

const STRETCH3: f64 = -1.0 / 6.0;
const SQUISH3: f64 = 1.0 / 3.0;
const NORM3: f64 = 103.0;
/// Gradient vectors (x, y, z), 24 of them.
const GRADIENTS3: [i8; 72] = [
    -11, 4, 4, -4, 11, 4, -4, 4, 11, //
    11, 4, 4, 4, 11, 4, 4, 4, 11, //
    -11, -4, 4, -4, -11, 4, -4, -4, 11, //
    11, -4, 4, 4, -11, 4, 4, -4, 11, //
    -11, 4, -4, -4, 11, -4, -4, 4, -11, //
    11, 4, -4, 4, 11, -4, 4, 4, -11, //
    -11, -4, -4, -4, -11, -4, -4, -4, -11, //
    11, -4, -4, 4, -11, -4, 4, -4, -11,
];
const LCG_A: i64 = 6364136223846793005;
const LCG_C: i64 = 1442695040888963407;

/// A seeded OpenSimplex generator (the permutation tables).
pub struct OpenSimplex {
    perm: [i64; 256],
    grad_index: [usize; 256],
}

/// An extra lattice vertex: its cell coordinates and the offset of the point from it.
struct Vertex {
    x: i64,
    y: i64,
    z: i64,
    dx: f64,
    dy: f64,
    dz: f64,
}

impl OpenSimplex {
    /// The package's `OpenSimplex(seed)`: Python integers are wrapped to i64 there as here.
    pub fn new(seed: i64) -> Self {
        let mut perm = [0i64; 256];
        let mut grad_index = [0usize; 256];
        let mut source: [i64; 256] = std::array::from_fn(|i| i as i64);
        let lcg = |s: i64| s.wrapping_mul(LCG_A).wrapping_add(LCG_C);
        let mut s = lcg(lcg(lcg(seed)));
        for i in (0..256usize).rev() {
            s = lcg(s);
            // Python's (seed + 31) % (i + 1): on the unwrapped sum, result in [0, i].
            let r = (s as i128 + 31).rem_euclid(i as i128 + 1) as usize;
            perm[i] = source[r];
            grad_index[i] = (perm[i] % 24) as usize * 3;
            source[r] = source[i];
        }
        Self { perm, grad_index }
    }

    fn extrapolate(&self, xsb: i64, ysb: i64, zsb: i64, dx: f64, dy: f64, dz: f64) -> f64 {
        let p = |i: i64| self.perm[(i & 0xff) as usize];
        let gi = self.grad_index[((p(p(xsb) + ysb) + zsb) & 0xff) as usize];
        let g = |k: usize| GRADIENTS3[gi + k] as f64;
        g(0) * dx + g(1) * dy + g(2) * dz
    }

    /// Adds the vertex's contribution when the point is inside its radius (as the package: skip otherwise).
    fn add(&self, value: &mut f64, v: &Vertex) {
        let attn = 2.0 - v.dx * v.dx - v.dy * v.dy - v.dz * v.dz;
        if attn > 0.0 {
            let a = attn * attn;
            *value += a * a * self.extrapolate(v.x, v.y, v.z, v.dx, v.dy, v.dz);
        }
    }

    /// `noise3(x, y, z)`, in [-1, 1].
    pub fn noise3(&self, x: f64, y: f64, z: f64) -> f64 {
        let stretch = (x + y + z) * STRETCH3;
        let (xs, ys, zs) = (x + stretch, y + stretch, z + stretch);
        let (xsb, ysb, zsb) = (xs.floor(), ys.floor(), zs.floor());
        let squish = (xsb + ysb + zsb) * SQUISH3;
        let (xb, yb, zb) = (xsb + squish, ysb + squish, zsb + squish);
        let (xins, yins, zins) = (xs - xsb, ys - ysb, zs - zsb);
        let in_sum = xins + yins + zins;
        let (dx0, dy0, dz0) = (x - xb, y - yb, z - zb);
        let (xsb, ysb, zsb) = (xsb as i64, ysb as i64, zsb as i64);
        let at = |ox: i64, oy: i64, oz: i64, dx: f64, dy: f64, dz: f64| Vertex {
            x: xsb + ox,
            y: ysb + oy,
            z: zsb + oz,
            dx,
            dy,
            dz,
        };
        let s2 = 2.0 * SQUISH3;
        let s3 = 3.0 * SQUISH3;
        let mut value = 0.0;
        let (ext0, ext1);
        if in_sum <= 1.0 {
            // Inside the tetrahedron at (0,0,0): the closest two of (1,0,0), (0,1,0), (0,0,1).
            let (mut a_point, mut a_score, mut b_point, mut b_score) = (1u8, xins, 2u8, yins);
            if a_score >= b_score && zins > b_score {
                b_score = zins;
                b_point = 4;
            } else if a_score < b_score && zins > a_score {
                a_score = zins;
                a_point = 4;
            }
            let wins = 1.0 - in_sum;
            if wins > a_score || wins > b_score {
                // (0,0,0) is one of the closest two vertices.
                let c = if b_score > a_score { b_point } else { a_point };
                let (x0, x1, dxe0, dxe1) = if c & 1 == 0 {
                    (-1, 0, dx0 + 1.0, dx0)
                } else {
                    (1, 1, dx0 - 1.0, dx0 - 1.0)
                };
                let (y0, y1, dye0, dye1) = if c & 2 == 0 {
                    if c & 1 == 0 {
                        (0, -1, dy0, dy0 + 1.0)
                    } else {
                        (-1, 0, dy0 + 1.0, dy0)
                    }
                } else {
                    (1, 1, dy0 - 1.0, dy0 - 1.0)
                };
                let (z0, z1, dze0, dze1) = if c & 4 == 0 {
                    (0, -1, dz0, dz0 + 1.0)
                } else {
                    (1, 1, dz0 - 1.0, dz0 - 1.0)
                };
                ext0 = at(x0, y0, z0, dxe0, dye0, dze0);
                ext1 = at(x1, y1, z1, dxe1, dye1, dze1);
            } else {
                // (0,0,0) is not one of the closest two: the extra vertices follow from those two.
                let c = a_point | b_point;
                let axis = |bit: u8, d0: f64| {
                    if c & bit == 0 {
                        (0, -1, d0 - s2, d0 + 1.0 - SQUISH3)
                    } else {
                        (1, 1, d0 - 1.0 - s2, d0 - 1.0 - SQUISH3)
                    }
                };
                let (x0, x1, dxe0, dxe1) = axis(1, dx0);
                let (y0, y1, dye0, dye1) = axis(2, dy0);
                let (z0, z1, dze0, dze1) = axis(4, dz0);
                ext0 = at(x0, y0, z0, dxe0, dye0, dze0);
                ext1 = at(x1, y1, z1, dxe1, dye1, dze1);
            }
            self.add(&mut value, &at(0, 0, 0, dx0, dy0, dz0));
            let (dx1, dy1, dz1) = (
                dx0 - 1.0 - SQUISH3,
                dy0 - 0.0 - SQUISH3,
                dz0 - 0.0 - SQUISH3,
            );
            self.add(&mut value, &at(1, 0, 0, dx1, dy1, dz1));
            let (dx2, dy2, dz2) = (dx0 - 0.0 - SQUISH3, dy0 - 1.0 - SQUISH3, dz1);
            self.add(&mut value, &at(0, 1, 0, dx2, dy2, dz2));
            let (dx3, dy3, dz3) = (dx2, dy1, dz0 - 1.0 - SQUISH3);
            self.add(&mut value, &at(0, 0, 1, dx3, dy3, dz3));
        } else if in_sum >= 2.0 {
            // Inside the tetrahedron at (1,1,1): the closest two of (1,1,0), (1,0,1), (0,1,1).
            let (mut a_point, mut a_score, mut b_point, mut b_score) = (6u8, xins, 5u8, yins);
            if a_score <= b_score && zins < b_score {
                b_score = zins;
                b_point = 3;
            } else if a_score > b_score && zins < a_score {
                a_score = zins;
                a_point = 3;
            }
            let wins = 3.0 - in_sum;
            if wins < a_score || wins < b_score {
                // (1,1,1) is one of the closest two vertices.
                let c = if b_score < a_score { b_point } else { a_point };
                let (x0, x1, dxe0, dxe1) = if c & 1 != 0 {
                    (2, 1, dx0 - 2.0 - s3, dx0 - 1.0 - s3)
                } else {
                    (0, 0, dx0 - s3, dx0 - s3)
                };
                let (y0, y1, dye0, dye1) = if c & 2 != 0 {
                    let d = dy0 - 1.0 - s3;
                    if c & 1 != 0 {
                        (1, 2, d, d - 1.0)
                    } else {
                        (2, 1, d - 1.0, d)
                    }
                } else {
                    (0, 0, dy0 - s3, dy0 - s3)
                };
                let (z0, z1, dze0, dze1) = if c & 4 != 0 {
                    (1, 2, dz0 - 1.0 - s3, dz0 - 2.0 - s3)
                } else {
                    (0, 0, dz0 - s3, dz0 - s3)
                };
                ext0 = at(x0, y0, z0, dxe0, dye0, dze0);
                ext1 = at(x1, y1, z1, dxe1, dye1, dze1);
            } else {
                // (1,1,1) is not one of the closest two.
                let c = a_point & b_point;
                let axis = |bit: u8, d0: f64| {
                    if c & bit != 0 {
                        (1, 2, d0 - 1.0 - SQUISH3, d0 - 2.0 - s2)
                    } else {
                        (0, 0, d0 - SQUISH3, d0 - s2)
                    }
                };
                let (x0, x1, dxe0, dxe1) = axis(1, dx0);
                let (y0, y1, dye0, dye1) = axis(2, dy0);
                let (z0, z1, dze0, dze1) = axis(4, dz0);
                ext0 = at(x0, y0, z0, dxe0, dye0, dze0);
                ext1 = at(x1, y1, z1, dxe1, dye1, dze1);
            }
            let (dx3, dy3, dz3) = (dx0 - 1.0 - s2, dy0 - 1.0 - s2, dz0 - 0.0 - s2);
            self.add(&mut value, &at(1, 1, 0, dx3, dy3, dz3));
            let (dx2, dy2, dz2) = (dx3, dy0 - 0.0 - s2, dz0 - 1.0 - s2);
            self.add(&mut value, &at(1, 0, 1, dx2, dy2, dz2));
            let (dx1, dy1, dz1) = (dx0 - 0.0 - s2, dy3, dz2);
            self.add(&mut value, &at(0, 1, 1, dx1, dy1, dz1));
            let (dxa, dya, dza) = (dx0 - 1.0 - s3, dy0 - 1.0 - s3, dz0 - 1.0 - s3);
            self.add(&mut value, &at(1, 1, 1, dxa, dya, dza));
        } else {
            // Inside the octahedron in between. Closest of (0,0,1) / (1,1,0), then of (0,1,0) / (1,0,1).
            let p1 = xins + yins;
            let (a_score, mut a_point, mut a_far) = if p1 > 1.0 {
                (p1 - 1.0, 3u8, true)
            } else {
                (1.0 - p1, 4u8, false)
            };
            let p2 = xins + zins;
            let (b_score, mut b_point, mut b_far) = if p2 > 1.0 {
                (p2 - 1.0, 5u8, true)
            } else {
                (1.0 - p2, 2u8, false)
            };
            // The closer of (1,0,0) / (0,1,1) replaces the further of the two above, if closer.
            let p3 = yins + zins;
            let (score, point, far) = if p3 > 1.0 {
                (p3 - 1.0, 6u8, true)
            } else {
                (1.0 - p3, 1u8, false)
            };
            if a_score <= b_score && a_score < score {
                a_point = point;
                a_far = far;
            } else if a_score > b_score && b_score < score {
                b_point = point;
                b_far = far;
            }
            if a_far == b_far {
                if a_far {
                    // Both on the (1,1,1) side: (1,1,1), and a vertex along the shared axis.
                    ext0 = at(1, 1, 1, dx0 - 1.0 - s3, dy0 - 1.0 - s3, dz0 - 1.0 - s3);
                    let c = a_point & b_point;
                    ext1 = if c & 1 != 0 {
                        at(2, 0, 0, dx0 - 2.0 - s2, dy0 - s2, dz0 - s2)
                    } else if c & 2 != 0 {
                        at(0, 2, 0, dx0 - s2, dy0 - 2.0 - s2, dz0 - s2)
                    } else {
                        at(0, 0, 2, dx0 - s2, dy0 - s2, dz0 - 2.0 - s2)
                    };
                } else {
                    // Both on the (0,0,0) side: (0,0,0), and a vertex along the omitted axis.
                    ext0 = at(0, 0, 0, dx0, dy0, dz0);
                    let c = a_point | b_point;
                    ext1 = if c & 1 == 0 {
                        at(
                            -1,
                            1,
                            1,
                            dx0 + 1.0 - SQUISH3,
                            dy0 - 1.0 - SQUISH3,
                            dz0 - 1.0 - SQUISH3,
                        )
                    } else if c & 2 == 0 {
                        at(
                            1,
                            -1,
                            1,
                            dx0 - 1.0 - SQUISH3,
                            dy0 + 1.0 - SQUISH3,
                            dz0 - 1.0 - SQUISH3,
                        )
                    } else {
                        at(
                            1,
                            1,
                            -1,
                            dx0 - 1.0 - SQUISH3,
                            dy0 - 1.0 - SQUISH3,
                            dz0 + 1.0 - SQUISH3,
                        )
                    };
                }
            } else {
                // One on each side: a permutation of (1,1,-1) and one of (0,0,2).
                let (c1, c2) = if a_far {
                    (a_point, b_point)
                } else {
                    (b_point, a_point)
                };
                ext0 = if c1 & 1 == 0 {
                    at(
                        -1,
                        1,
                        1,
                        dx0 + 1.0 - SQUISH3,
                        dy0 - 1.0 - SQUISH3,
                        dz0 - 1.0 - SQUISH3,
                    )
                } else if c1 & 2 == 0 {
                    at(
                        1,
                        -1,
                        1,
                        dx0 - 1.0 - SQUISH3,
                        dy0 + 1.0 - SQUISH3,
                        dz0 - 1.0 - SQUISH3,
                    )
                } else {
                    at(
                        1,
                        1,
                        -1,
                        dx0 - 1.0 - SQUISH3,
                        dy0 - 1.0 - SQUISH3,
                        dz0 + 1.0 - SQUISH3,
                    )
                };
                let (dx, dy, dz) = (dx0 - s2, dy0 - s2, dz0 - s2);
                ext1 = if c2 & 1 != 0 {
                    at(2, 0, 0, dx - 2.0, dy, dz)
                } else if c2 & 2 != 0 {
                    at(0, 2, 0, dx, dy - 2.0, dz)
                } else {
                    at(0, 0, 2, dx, dy, dz - 2.0)
                };
            }
            let (dx1, dy1, dz1) = (
                dx0 - 1.0 - SQUISH3,
                dy0 - 0.0 - SQUISH3,
                dz0 - 0.0 - SQUISH3,
            );
            self.add(&mut value, &at(1, 0, 0, dx1, dy1, dz1));
            let (dx2, dy2, dz2) = (dx0 - 0.0 - SQUISH3, dy0 - 1.0 - SQUISH3, dz1);
            self.add(&mut value, &at(0, 1, 0, dx2, dy2, dz2));
            let (dx3, dy3, dz3) = (dx2, dy1, dz0 - 1.0 - SQUISH3);
            self.add(&mut value, &at(0, 0, 1, dx3, dy3, dz3));
            let (dx4, dy4, dz4) = (dx0 - 1.0 - s2, dy0 - 1.0 - s2, dz0 - 0.0 - s2);
            self.add(&mut value, &at(1, 1, 0, dx4, dy4, dz4));
            let (dx5, dy5, dz5) = (dx4, dy0 - 0.0 - s2, dz0 - 1.0 - s2);
            self.add(&mut value, &at(1, 0, 1, dx5, dy5, dz5));
            let (dx6, dy6, dz6) = (dx0 - 0.0 - s2, dy4, dz5);
            self.add(&mut value, &at(0, 1, 1, dx6, dy6, dz6));
        }
        self.add(&mut value, &ext0);
        self.add(&mut value, &ext1);
        value / NORM3
    }

    /// `noise3array(arange(w), arange(h), arange(c))`: a `[c, h, w]` field at integer coordinates.
    pub fn field(&self, [c, h, w]: [usize; 3]) -> Vec<f64> {
        let mut out = Vec::with_capacity(c * h * w);
        for z in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out.push(self.noise3(x as f64, y as f64, z as f64));
                }
            }
        }
        out
    }
}
