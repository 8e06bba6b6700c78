"""Seeded generator of short, templated physics chain-of-thought records.

Each record has the same fields as data/physics_cot.jsonl (domain, question, CoT, response) plus
template (its name), params (the random inputs, as stated in the question), answer (the final number,
a float, in the unit named by unit). Every CoT derives the result with the actual intermediate numbers,
then opens a verification step with a trigger sentence ("To check, ...", "Let me verify: ...") in its
second half, then states the answer, so the <examine> split of the training script has something to find.
About half of the CoTs are laid out like the real long-reasoning traces (paragraphs separated by blank lines, and a
closing **Final Answer** header over a display equation with the boxed value), the others as one line of sentences.
The texts are original and kept short (about 60-160 words) because a tiny model is trained on them on CPU.

    from data.synth import generate
    records = generate(2000, seed=0)          # deterministic for a given (n, seed)

Run as a script (from the repo root):

    python data/synth.py --n 2000 --seed 0 --out out/data/synth.jsonl

Standard library and the kit's common.py only.
"""

import argparse
import json
import math
import os
import random
import sys
from decimal import Decimal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the kit's root, for common.py
from common import atomic_write  # noqa: E402

# Constants, stated in the texts with exactly these values so every number in a record can be re-derived.
G_EARTH = 9.81            # m/s^2
K_E = 8.99e9              # N m^2/C^2
EPS0 = 8.85e-12           # F/m
MU0 = 4e-7 * math.pi      # T m/A
G_NEWTON = 6.674e-11      # N m^2/kg^2
C_LIGHT = 2.998e8         # m/s
M_SUN = 1.989e30          # kg
R_SUN = 6.957e8           # m
ARCSEC_PER_RAD = 180 * 3600 / math.pi

DE, TM, EM, GR = "differential_equations", "theoretical_mechanics", "electromagnetism", "general_relativity"


# -----------------------------------------------------------------------------
# Small helpers


def fmt(x, sig=3):
    """x to `sig` significant figures: plain decimals for 1e-4 <= |x| < 1e5, else compact e-notation (8.85e-12)."""
    s = f"{x:.{sig}g}"
    if "e" not in s:
        return s
    mant, exp = s.split("e")
    if -4 <= int(exp) < 5:
        # "1230" reads better than "1.23e+03"; Decimal expands the rounded value without float noise.
        return format(Decimal(s), "f")
    return f"{mant}e{int(exp)}"


def _draw(rng, lo, hi, sig=2):
    """A uniform value in [lo, hi] rounded to `sig` significant figures, so the question states it exactly."""
    return float(f"{rng.uniform(lo, hi):.{sig}g}")


def _pick(rng, *options):
    """One phrasing out of several, so generated texts are not all identical."""
    return rng.choice(options)


def _check_opener(rng):
    """The start of the verification sentence; each one begins with a trigger the <examine> split looks for."""
    return _pick(rng, "To check, ", "To verify, ", "Let me verify: ", "Let me double-check: ",
                 "As a sanity check, ", "Let me check: ")


def _final(rng, what, value, unit):
    """The closing answer sentence (never a trigger)."""
    v = f"{value} {unit}".strip()
    return _pick(rng, f"So {what} ≈ {v}.", f"Therefore {what} is about {v}.", f"The final answer is {what} ≈ {v}.")


# -----------------------------------------------------------------------------
# Templates. Each takes an rng and returns dict(question, steps, checks, final, response, answer, unit, params);
# `checks` starts with the trigger sentence. Parameter draws come first so params fully determine the answer.


def t_exp_decay(rng):
    k, y0, t = _draw(rng, 0.05, 0.5), _draw(rng, 10, 500), _draw(rng, 1, 10)
    kt = k * t
    f = math.exp(-kt)
    ans = y0 * f
    th = math.log(2) / k
    q = _pick(rng,
              f"A quantity obeys dy/dt = -k y with k = {k:g} s^-1 and y(0) = {y0:g}. Find y at t = {t:g} s.",
              f"Solve y' = -{k:g} y (t in seconds) with y(0) = {y0:g}, and evaluate y({t:g}).",
              f"A sample decays according to dy/dt = -ky, k = {k:g} s^-1, starting from y(0) = {y0:g}. What is y after {t:g} s?")
    steps = [
        _pick(rng, "Separating variables, dy/y = -k dt, so ln y = -kt + C.",
              "The equation is separable: ∫dy/y = -k∫dt gives ln y = -kt + C."),
        f"With y(0) = {y0:g} this becomes y(t) = {y0:g} e^(-{k:g}t).",
        f"At t = {t:g} s the exponent is kt = {fmt(kt, 4)}, and e^(-{fmt(kt, 4)}) = {fmt(f, 4)}.",
        f"Multiplying, y = {y0:g} × {fmt(f, 4)} = {fmt(ans, 4)}.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"the half-life ln 2/k = {fmt(th, 4)} s means t is {fmt(t / th, 4)} half-lives, and {y0:g} × 2^(-{fmt(t / th, 4)}) = {fmt(ans, 4)} again.",
        f"differentiating y0 e^(-kt) gives -k y0 e^(-kt) = -ky, so the ODE holds, and at t = 0 it returns {y0:g}.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, f"y({t:g})", fmt(ans), ""),
                response=f"y(t) = {y0:g} e^(-{k:g}t), so y({t:g}) ≈ {fmt(ans)}.",
                answer=ans, unit="", params=dict(k=k, y0=y0, t=t))


def t_newton_cooling(rng):
    T0, Ta, k, t = _draw(rng, 60, 95), _draw(rng, 15, 25), _draw(rng, 0.02, 0.15), _draw(rng, 5, 40)
    u0 = T0 - Ta
    f = math.exp(-k * t)
    ans = Ta + u0 * f
    q = _pick(rng,
              f"Tea at {T0:g} °C cools in a {Ta:g} °C room by Newton's law of cooling with k = {k:g} min^-1. What is its temperature after {t:g} min?",
              f"By Newton's law of cooling, dT/dt = -k(T - T_a) with k = {k:g} min^-1 and T_a = {Ta:g} °C. If T(0) = {T0:g} °C, find T at t = {t:g} min.")
    steps = [
        _pick(rng, "Newton's law dT/dt = -k(T - T_a) makes the excess temperature decay exponentially.",
              "The cooling rate is proportional to the excess temperature, dT/dt = -k(T - T_a)."),
        f"With u = T - T_a the equation is u' = -ku, so u = u0 e^(-kt) with u0 = {T0:g} - {Ta:g} = {fmt(u0, 4)} °C.",
        f"After {t:g} min, kt = {fmt(k * t, 4)} and e^(-kt) = {fmt(f, 4)}.",
        f"The excess is then {fmt(u0, 4)} × {fmt(f, 4)} = {fmt(u0 * f, 4)} °C, so T = {Ta:g} + {fmt(u0 * f, 4)} = {fmt(ans, 4)} °C.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"at t = 0 the formula returns {T0:g} °C and as t → ∞ it tends to {Ta:g} °C, so {fmt(ans)} °C lying between them is consistent.",
        f"the cooling rate falls from k u0 = {fmt(k * u0, 3)} °C/min to {fmt(k * u0 * f, 3)} °C/min at t = {t:g} min, as it should while T nears T_a.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, f"T({t:g} min)", fmt(ans), "°C"),
                response=f"T(t) = {Ta:g} + {fmt(u0, 4)} e^(-{k:g}t), so after {t:g} min T ≈ {fmt(ans)} °C.",
                answer=ans, unit="°C", params=dict(T0=T0, Ta=Ta, k=k, t=t))


def t_damped_oscillator(rng):
    m, k = _draw(rng, 0.2, 2.0), _draw(rng, 10, 200)
    # b at most 0.8 of critical damping, so the 2-significant-figure rounding cannot make it overdamped.
    b = float(f"{rng.uniform(0.1, 0.8) * 2 * math.sqrt(k * m):.2g}")
    gamma = b / (2 * m)
    w0sq = k / m
    ans = math.sqrt(w0sq - gamma ** 2)
    q = _pick(rng,
              f"A mass m = {m:g} kg on a spring k = {k:g} N/m has damping constant b = {b:g} kg/s. Find the angular frequency of its damped oscillations.",
              f"Solve m x'' + b x' + k x = 0 with m = {m:g} kg, b = {b:g} kg/s and k = {k:g} N/m: what is the damped angular frequency ω_d?")
    steps = [
        "Trying x = e^(rt) gives the characteristic equation m r^2 + b r + k = 0.",
        f"The discriminant is b^2 - 4mk = {fmt(b * b, 4)} - {fmt(4 * m * k, 4)} = {fmt(b * b - 4 * m * k, 4)}, which is negative, so the motion is underdamped.",
        f"The roots are r = -γ ± iω_d with γ = b/(2m) = {fmt(gamma, 4)} s^-1 and ω0^2 = k/m = {fmt(w0sq, 4)} s^-2.",
        f"Thus ω_d = √(ω0^2 - γ^2) = √({fmt(w0sq, 4)} - {fmt(gamma ** 2, 4)}) = {fmt(ans, 4)} rad/s.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"ω_d^2 + γ^2 = {fmt(ans ** 2, 4)} + {fmt(gamma ** 2, 4)} = {fmt(ans ** 2 + gamma ** 2, 4)}, which reproduces k/m.",
        f"ω_d must lie just below the undamped ω0 = {fmt(math.sqrt(w0sq), 4)} rad/s, and it does; with b = 0 the two would coincide.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "ω_d", fmt(ans), "rad/s"),
                response=f"The oscillator is underdamped and ω_d = √(k/m - (b/2m)^2) ≈ {fmt(ans)} rad/s.",
                answer=ans, unit="rad/s", params=dict(m=m, k=k, b=b))


def t_logistic(rng):
    r, K, t = _draw(rng, 0.1, 1.0), _draw(rng, 500, 5000), _draw(rng, 1, 10)
    P0 = _draw(rng, 0.02 * K, 0.4 * K)
    A = (K - P0) / P0
    f = math.exp(-r * t)
    ans = K / (1 + A * f)
    q = _pick(rng,
              f"A population grows logistically, dP/dt = rP(1 - P/K), with r = {r:g} per year, K = {K:g} and P(0) = {P0:g}. Find P after {t:g} years.",
              f"Solve the logistic equation P' = {r:g} P (1 - P/{K:g}) with P(0) = {P0:g} (t in years) and evaluate P({t:g}).")
    steps = [
        _pick(rng, "The logistic equation separates, and partial fractions give ln[P/(K - P)] = rt + C.",
              "Separating variables and using 1/(P(1 - P/K)) = 1/P + 1/(K - P) gives ln[P/(K - P)] = rt + C."),
        f"Solving, P(t) = K/(1 + A e^(-rt)) with A = (K - P0)/P0 = ({K:g} - {P0:g})/{P0:g} = {fmt(A, 4)}.",
        f"At t = {t:g}, rt = {fmt(r * t, 4)} and e^(-rt) = {fmt(f, 4)}.",
        f"So P = {K:g}/(1 + {fmt(A, 4)} × {fmt(f, 4)}) = {K:g}/{fmt(1 + A * f, 4)} = {fmt(ans, 4)}.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"at t = 0 the formula gives K/(1 + A) = {fmt(K / (1 + A), 4)}, the initial population, and {fmt(ans)} stays below K = {K:g} as it must.",
        f"P grew from {P0:g} toward K = {K:g} without overshooting, and K/(1 + A) = {fmt(K / (1 + A), 4)} recovers P0.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, f"P({t:g})", fmt(ans), ""),
                response=f"P(t) = {K:g}/(1 + {fmt(A, 4)} e^(-{r:g}t)), so P({t:g}) ≈ {fmt(ans)}.",
                answer=ans, unit="", params=dict(r=r, K=K, P0=P0, t=t))


def t_projectile_range(rng):
    v0, th = _draw(rng, 5, 40, 3), rng.randint(15, 75)
    rad = math.radians(th)
    vx, vy = v0 * math.cos(rad), v0 * math.sin(rad)
    T = 2 * vy / G_EARTH
    ans = v0 ** 2 * math.sin(2 * rad) / G_EARTH
    q = _pick(rng,
              f"A ball is launched at {v0:g} m/s at {th}° above level ground. Neglecting air resistance and taking g = 9.81 m/s^2, find its range.",
              f"A projectile leaves the ground with speed {v0:g} m/s at an angle of {th}°. How far away does it land (g = 9.81 m/s^2, no drag)?")
    steps = [
        "With no drag the horizontal velocity is constant and the vertical motion has acceleration -g.",
        f"The components are v_x = v0 cos θ = {fmt(vx, 4)} m/s and v_y = v0 sin θ = {fmt(vy, 4)} m/s.",
        f"The ball returns to y = 0 when v_y t - ½ g t^2 = 0, at T = 2 v_y/g = {fmt(T, 4)} s.",
        f"In that time it travels R = v_x T = {fmt(vx, 4)} × {fmt(T, 4)} = {fmt(ans, 4)} m.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"the closed form R = v0^2 sin 2θ/g = {fmt(v0 ** 2, 4)} × {fmt(math.sin(2 * rad), 4)}/9.81 = {fmt(ans, 4)} m agrees.",
        f"v0^2/g has units (m/s)^2/(m/s^2) = m, and v0^2 sin 2θ/g = {fmt(ans, 4)} m reproduces the same range.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "the range", fmt(ans), "m"),
                response=f"R = v0^2 sin 2θ/g ≈ {fmt(ans)} m.",
                answer=ans, unit="m", params=dict(v0=v0, theta_deg=th))


def t_pendulum_period(rng):
    L = _draw(rng, 0.2, 3.0)
    w = math.sqrt(G_EARTH / L)
    ans = 2 * math.pi / w
    q = _pick(rng,
              f"Find the small-angle period of a simple pendulum of length {L:g} m (g = 9.81 m/s^2).",
              f"A simple pendulum is {L:g} m long. What is its period for small oscillations, with g = 9.81 m/s^2?")
    steps = [
        "The equation of motion is θ'' = -(g/L) sin θ, and for small swings sin θ ≈ θ makes it simple harmonic.",
        "The bob's mass cancels, so only L and g matter.",
        f"The angular frequency is ω = √(g/L) = √(9.81/{L:g}) = {fmt(w, 4)} rad/s.",
        f"The period is T = 2π/ω = 2π/{fmt(w, 4)} = {fmt(ans, 4)} s.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"inverting, g T^2/(4π^2) = 9.81 × {fmt(ans ** 2, 4)}/39.48 = {fmt(G_EARTH * ans ** 2 / (4 * math.pi ** 2), 4)} m, which recovers L.",
        f"√(L/g) has units √(m/(m/s^2)) = s, and 2π √({L:g}/9.81) = {fmt(ans, 4)} s again.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "the period", fmt(ans), "s"),
                response=f"T = 2π√(L/g) = 2π√({L:g}/9.81) ≈ {fmt(ans)} s.",
                answer=ans, unit="s", params=dict(L=L))


def t_spring_energy(rng):
    m, k, A = _draw(rng, 0.1, 3.0), _draw(rng, 5, 400), _draw(rng, 0.02, 0.3)
    w = math.sqrt(k / m)
    E = 0.5 * k * A ** 2
    ans = math.sqrt(2 * E / m)
    q = _pick(rng,
              f"A {m:g} kg mass on a spring of constant {k:g} N/m oscillates with amplitude {A:g} m on a frictionless surface. Find its frequency, energy and maximum speed.",
              f"A spring (k = {k:g} N/m) and mass (m = {m:g} kg) oscillate with amplitude {A:g} m. What is the maximum speed of the mass?")
    steps = [
        f"The angular frequency is ω = √(k/m) = √({k:g}/{m:g}) = {fmt(w, 4)} rad/s, so f = ω/2π = {fmt(w / (2 * math.pi), 4)} Hz.",
        f"The total energy is E = ½ k A^2 = ½ × {k:g} × {A:g}^2 = {fmt(E, 4)} J.",
        "At equilibrium all of it is kinetic, ½ m v_max^2 = E.",
        f"So v_max = √(2E/m) = √(2 × {fmt(E, 4)}/{m:g}) = {fmt(ans, 4)} m/s.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"the SHM result v_max = Aω = {A:g} × {fmt(w, 4)} = {fmt(A * w, 4)} m/s gives the same speed.",
        f"½ m v_max^2 = ½ × {m:g} × {fmt(ans ** 2, 4)} = {fmt(0.5 * m * ans ** 2, 4)} J matches E.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "v_max", fmt(ans), "m/s"),
                response=f"ω = {fmt(w)} rad/s and E = ½kA^2 = {fmt(E)} J, so v_max = Aω ≈ {fmt(ans)} m/s.",
                answer=ans, unit="m/s", params=dict(m=m, k=k, A=A))


def t_incline_friction(rng):
    th = rng.randint(20, 50)
    rad = math.radians(th)
    # Kinetic friction below tan θ so the block really accelerates down the slope.
    mu = round(rng.uniform(0.05, 0.8 * math.tan(rad)), 2)
    s, c = math.sin(rad), math.cos(rad)
    ans = G_EARTH * (s - mu * c)
    q = _pick(rng,
              f"A block slides down a {th}° incline with coefficient of kinetic friction {mu:g}. Find its acceleration (g = 9.81 m/s^2).",
              f"What is the acceleration of a crate sliding down a plane inclined at {th}° if μ_k = {mu:g}? Take g = 9.81 m/s^2.")
    steps = [
        "Along the slope gravity contributes m g sin θ downhill, and kinetic friction μ m g cos θ opposes the sliding.",
        f"For θ = {th}°, sin θ = {fmt(s, 4)} and cos θ = {fmt(c, 4)}.",
        f"Since μ = {mu:g} is below tan θ = {fmt(s / c, 4)}, the block does speed up.",
        f"Newton's second law gives a = g(sin θ - μ cos θ) = 9.81 × ({fmt(s, 4)} - {fmt(mu * c, 4)}) = {fmt(ans, 4)} m/s^2.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"with μ = 0 the result would be g sin θ = {fmt(G_EARTH * s, 4)} m/s^2, and friction lowers it to {fmt(ans, 4)} m/s^2, as expected.",
        f"the mass cancelled, and a has units of g; the friction share μ g cos θ = {fmt(G_EARTH * mu * c, 4)} m/s^2 is smaller than g sin θ = {fmt(G_EARTH * s, 4)} m/s^2.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "a", fmt(ans), "m/s^2"),
                response=f"a = g(sin θ - μ cos θ) ≈ {fmt(ans)} m/s^2 down the incline.",
                answer=ans, unit="m/s^2", params=dict(theta_deg=th, mu=mu))


def t_coulomb(rng):
    q1 = _draw(rng, 1.0, 9.9) * rng.choice((1, -1))
    q2 = _draw(rng, 1.0, 9.9) * rng.choice((1, -1))
    r = _draw(rng, 0.05, 1.0)
    prod = abs(q1 * q2) * 1e-12
    ans = K_E * prod / r ** 2
    kind = "repulsive" if q1 * q2 > 0 else "attractive"
    q = _pick(rng,
              f"Two point charges, {q1:g} μC and {q2:g} μC, are {r:g} m apart. Find the magnitude of the force between them (k_e = 8.99e9 N m^2/C^2).",
              f"What force does a {q1:g} μC charge exert on a {q2:g} μC charge {r:g} m away? Use k_e = 8.99e9 N m^2/C^2.")
    steps = [
        "Coulomb's law gives the magnitude F = k_e |q1 q2|/r^2.",
        f"The charge product is |{q1:g}e-6 × {q2:g}e-6| = {fmt(prod, 4)} C^2, and r^2 = {fmt(r * r, 4)} m^2.",
        f"So F = 8.99e9 × {fmt(prod, 4)}/{fmt(r * r, 4)} = {fmt(ans, 4)} N.",
        f"The charges have {'the same sign' if q1 * q2 > 0 else 'opposite signs'}, so the force is {kind}.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"the units are (N m^2/C^2)(C^2)/m^2 = N, and doubling r would cut F by four to {fmt(ans / 4, 4)} N.",
        f"the field of the first charge at that distance is k_e|q1|/r^2 = {fmt(K_E * abs(q1) * 1e-6 / r ** 2, 4)} N/C, and times |q2| it gives {fmt(ans, 4)} N again.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "F", fmt(ans), "N"),
                response=f"F = k_e|q1 q2|/r^2 ≈ {fmt(ans)} N, {kind}.",
                answer=ans, unit="N", params=dict(q1_uC=q1, q2_uC=q2, r=r))


def t_capacitor_energy(rng):
    A, d_mm, V = _draw(rng, 0.02, 0.5), _draw(rng, 0.5, 3.0), _draw(rng, 50, 500)
    C = EPS0 * A / (d_mm * 1e-3)
    U = 0.5 * C * V ** 2
    ans = U * 1e6
    q = _pick(rng,
              f"A parallel-plate capacitor has plates of area {A:g} m^2 separated by {d_mm:g} mm of air and is charged to {V:g} V. Find the stored energy in μJ (ε₀ = 8.85e-12 F/m).",
              f"How much energy, in microjoules, does an air-filled parallel-plate capacitor with A = {A:g} m^2 and d = {d_mm:g} mm store at {V:g} V? Take ε₀ = 8.85e-12 F/m.")
    steps = [
        "For parallel plates with a uniform field between them, C = ε₀ A/d.",
        f"With d = {d_mm:g} mm = {fmt(d_mm * 1e-3, 4)} m, C = 8.85e-12 × {A:g}/{fmt(d_mm * 1e-3, 4)} = {fmt(C, 4)} F.",
        f"The stored energy is U = ½ C V^2 = ½ × {fmt(C, 4)} × {V:g}^2 = {fmt(U, 4)} J.",
        f"In microjoules that is {fmt(ans, 4)} μJ.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"the charge is Q = CV = {fmt(C * V, 4)} C, and U = QV/2 = {fmt(C * V * V / 2, 4)} J gives the same energy.",
        f"the field E = V/d = {fmt(V / (d_mm * 1e-3), 4)} V/m has energy density ½ε₀E^2 = {fmt(0.5 * EPS0 * (V / (d_mm * 1e-3)) ** 2, 4)} J/m^3, and times the volume A d it gives {fmt(U, 4)} J too.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "U", fmt(ans), "μJ"),
                response=f"C = ε₀A/d = {fmt(C)} F and U = ½CV^2 ≈ {fmt(ans)} μJ.",
                answer=ans, unit="μJ", params=dict(A=A, d_mm=d_mm, V=V))


def t_rc_charging(rng):
    R_k, C_u, V = _draw(rng, 1, 100), _draw(rng, 1, 100), _draw(rng, 3, 24)
    tau = R_k * 1e3 * C_u * 1e-6
    t = float(f"{rng.uniform(0.2, 3.0) * tau:.2g}")
    x = t / tau
    frac = 1 - math.exp(-x)
    Qf = C_u * V                       # μC
    ans = Qf * frac
    q = _pick(rng,
              f"An uncharged {C_u:g} μF capacitor is charged through a {R_k:g} kΩ resistor by a {V:g} V battery. Find its charge in μC after {t:g} s.",
              f"In an RC circuit with R = {R_k:g} kΩ, C = {C_u:g} μF and EMF {V:g} V, the capacitor starts empty. What charge (in μC) does it hold at t = {t:g} s?")
    steps = [
        "The loop rule R dq/dt + q/C = V with q(0) = 0 gives q = CV(1 - e^(-t/RC)).",
        f"The time constant is τ = RC = {R_k:g} kΩ × {C_u:g} μF = {fmt(tau, 4)} s.",
        f"The full charge would be CV = {C_u:g} μF × {V:g} V = {fmt(Qf, 4)} μC.",
        f"At t = {t:g} s, t/τ = {fmt(x, 4)} and 1 - e^(-t/τ) = {fmt(frac, 4)}.",
        f"So q = {fmt(Qf, 4)} × {fmt(frac, 4)} = {fmt(ans, 4)} μC.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"q/C = {fmt(V * frac, 4)} V on the capacitor plus V e^(-t/τ) = {fmt(V * (1 - frac), 4)} V on the resistor gives the {V:g} V source.",
        f"q is below the full {fmt(Qf, 4)} μC, and at t = 0 the bracket 1 - e^0 vanishes, as it must for an empty capacitor.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "q", fmt(ans), "μC"),
                response=f"With τ = RC = {fmt(tau)} s, q = CV(1 - e^(-t/τ)) ≈ {fmt(ans)} μC.",
                answer=ans, unit="μC", params=dict(R_kohm=R_k, C_uF=C_u, V=V, t=t))


def t_solenoid_field(rng):
    N, L, I = _draw(rng, 100, 2000), _draw(rng, 0.1, 1.0), _draw(rng, 0.5, 10)
    n = N / L
    B = MU0 * n * I
    ans = B * 1e3
    q = _pick(rng,
              f"A long solenoid of length {L:g} m has {N:g} turns and carries {I:g} A. Find the magnetic field inside it in mT (μ₀ = 4π×10⁻⁷ T m/A).",
              f"What is the field, in millitesla, inside a {L:g} m solenoid wound with {N:g} turns carrying a current of {I:g} A? Use μ₀ = 4π×10⁻⁷ T m/A.")
    steps = [
        "Ampère's law on a rectangular loop straddling the winding gives B ℓ = μ₀ n ℓ I, so B = μ₀ n I inside a long solenoid.",
        f"The turn density is n = N/L = {N:g}/{L:g} = {fmt(n, 4)} turns/m.",
        f"So B = 4π×10⁻⁷ × {fmt(n, 4)} × {I:g} = {fmt(B, 4)} T.",
        f"In millitesla that is {fmt(ans, 4)} mT.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"the units are (T m/A)(1/m)(A) = T, and doubling the current would double B to {fmt(2 * ans, 4)} mT, as a linear law requires.",
        f"B/(μ₀ I) = {fmt(B / (MU0 * I), 4)} per metre reproduces the turn density N/L.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "B", fmt(ans), "mT"),
                response=f"B = μ₀NI/L ≈ {fmt(ans)} mT, directed along the axis.",
                answer=ans, unit="mT", params=dict(N=N, L=L, I=I))


def _rs_m(m_solar):
    """Schwarzschild radius in metres of m_solar solar masses."""
    return 2 * G_NEWTON * m_solar * M_SUN / C_LIGHT ** 2


def t_schwarzschild_radius(rng):
    Ms = _draw(rng, 1, 50, 3)
    M = Ms * M_SUN
    rs = _rs_m(Ms)
    ans = rs / 1e3
    q = _pick(rng,
              f"Find the Schwarzschild radius, in km, of a black hole of {Ms:g} solar masses (M_sun = 1.989e30 kg, G = 6.674e-11, c = 2.998e8 m/s).",
              f"A black hole has mass {Ms:g} M_sun. Using G = 6.674e-11 N m^2/kg^2, c = 2.998e8 m/s and M_sun = 1.989e30 kg, what is its event-horizon radius in km?")
    steps = [
        "The Schwarzschild radius r_s = 2GM/c^2 is where the metric factor 1 - 2GM/(rc^2) vanishes.",
        f"The mass is M = {Ms:g} × 1.989e30 = {fmt(M, 4)} kg.",
        f"Then 2GM = 2 × 6.674e-11 × {fmt(M, 4)} = {fmt(2 * G_NEWTON * M, 4)} m^3/s^2, and c^2 = 8.988e16 m^2/s^2.",
        f"So r_s = {fmt(rs, 4)} m = {fmt(ans, 4)} km.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"the Sun's r_s is {fmt(_rs_m(1.0) / 1e3, 4)} km and r_s grows linearly with mass, so {Ms:g} × {fmt(_rs_m(1.0) / 1e3, 4)} = {fmt(Ms * _rs_m(1.0) / 1e3, 4)} km agrees.",
        f"GM/c^2 has units (m^3/s^2)/(m^2/s^2) = m, and its value {fmt(ans / 2, 4)} km doubled gives {fmt(ans, 4)} km again.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "r_s", fmt(ans), "km"),
                response=f"r_s = 2GM/c^2 ≈ {fmt(ans)} km.",
                answer=ans, unit="km", params=dict(M_solar=Ms))


def t_time_dilation(rng):
    Ms = _draw(rng, 1, 20)
    rs_km = _rs_m(Ms) / 1e3
    r_km = float(f"{rng.uniform(1.5, 20) * rs_km:.3g}")
    ratio = rs_km / r_km
    ans = math.sqrt(1 - ratio)
    q = _pick(rng,
              f"A clock hovers at r = {r_km:g} km from a {Ms:g} solar-mass black hole. At what fraction of a distant clock's rate does it tick? (G = 6.674e-11, c = 2.998e8 m/s, M_sun = 1.989e30 kg)",
              f"Find the gravitational time dilation factor dτ/dt for a static observer at r = {r_km:g} km outside a mass of {Ms:g} M_sun (M_sun = 1.989e30 kg, G = 6.674e-11, c = 2.998e8 m/s).")
    steps = [
        "For a static clock in the Schwarzschild metric only the dt term survives, so dτ/dt = √(1 - r_s/r).",
        f"For {Ms:g} solar masses r_s = 2GM/c^2 = {fmt(rs_km, 4)} km.",
        f"At r = {r_km:g} km the ratio is r_s/r = {fmt(ratio, 4)}.",
        f"So dτ/dt = √(1 - {fmt(ratio, 4)}) = √({fmt(1 - ratio, 4)}) = {fmt(ans, 4)}.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"squaring gives {fmt(ans ** 2, 4)}, and 1 minus that is {fmt(1 - ans ** 2, 4)}, which is r_s/r again.",
        f"the factor is below 1, so the clock runs slow, and it would tend to 1 far away, where r_s/r → 0.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "dτ/dt", fmt(ans), ""),
                response=f"dτ/dt = √(1 - r_s/r) with r_s = {fmt(rs_km)} km, giving about {fmt(ans)}.",
                answer=ans, unit="", params=dict(M_solar=Ms, r_km=r_km))


def t_grav_redshift(rng):
    Ms, R_km = _draw(rng, 1.0, 2.2), _draw(rng, 10, 16, 3)
    rs_km = _rs_m(Ms) / 1e3
    ratio = rs_km / R_km
    sq = math.sqrt(1 - ratio)
    ans = 1 / sq - 1
    q = _pick(rng,
              f"Light leaves the surface of a neutron star of mass {Ms:g} M_sun and radius {R_km:g} km. Find its gravitational redshift z (M_sun = 1.989e30 kg, G = 6.674e-11, c = 2.998e8 m/s).",
              f"What redshift z does a distant observer measure for radiation emitted at the surface (R = {R_km:g} km) of a {Ms:g} solar-mass neutron star? Use G = 6.674e-11, c = 2.998e8 m/s, M_sun = 1.989e30 kg.")
    steps = [
        "A static emitter at radius R ticks slow by √(1 - r_s/R), so the received frequency drops and 1 + z = 1/√(1 - r_s/R).",
        f"For {Ms:g} solar masses r_s = 2GM/c^2 = {fmt(rs_km, 4)} km.",
        f"At R = {R_km:g} km, r_s/R = {fmt(ratio, 4)} and √(1 - r_s/R) = {fmt(sq, 4)}.",
        f"So 1 + z = {fmt(1 / sq, 4)} and z = {fmt(ans, 4)}.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"the weak-field estimate z ≈ r_s/(2R) = {fmt(ratio / 2, 4)} is smaller but of the same order, as expected since r_s/R is not small here.",
        f"(1 + z)^2 (1 - r_s/R) = {fmt((1 + ans) ** 2, 4)} × {fmt(1 - ratio, 4)} = {fmt((1 + ans) ** 2 * (1 - ratio), 4)}, which is 1 as required.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "z", fmt(ans), ""),
                response=f"1 + z = 1/√(1 - r_s/R) with r_s = {fmt(rs_km)} km, so z ≈ {fmt(ans)}.",
                answer=ans, unit="", params=dict(M_solar=Ms, R_km=R_km))


def t_light_deflection(rng):
    Ms, b_sr = _draw(rng, 0.5, 20), _draw(rng, 1, 10)
    two_rs = 2 * _rs_m(Ms)
    b = b_sr * R_SUN
    rad = two_rs / b
    ans = rad * ARCSEC_PER_RAD
    q = _pick(rng,
              f"Starlight passes a star of {Ms:g} solar masses with impact parameter {b_sr:g} solar radii. Find the deflection angle in arcseconds (M_sun = 1.989e30 kg, R_sun = 6.957e8 m, G = 6.674e-11, c = 2.998e8 m/s).",
              f"A light ray grazes a {Ms:g} M_sun lens at b = {b_sr:g} R_sun. Using δ = 4GM/(c^2 b), find δ in arcsec (R_sun = 6.957e8 m, M_sun = 1.989e30 kg, G = 6.674e-11, c = 2.998e8 m/s).")
    steps = [
        "In the weak field a ray with impact parameter b is bent by δ = 4GM/(c^2 b) = 2r_s/b, twice the Newtonian value.",
        f"For {Ms:g} solar masses, 4GM/c^2 = {fmt(two_rs, 4)} m.",
        f"With b = {b_sr:g} × 6.957e8 = {fmt(b, 4)} m, δ = {fmt(two_rs, 4)}/{fmt(b, 4)} = {fmt(rad, 4)} rad.",
        f"Using 206265 arcsec per radian, δ = {fmt(ans, 4)} arcsec.",
    ]
    checks = [_check_opener(rng) + _pick(
        rng,
        f"δ × b/M = {fmt(ans * b_sr / Ms, 4)} arcsec per solar mass per solar radius, the classic 1.75 arcsec bending at the Sun's limb.",
        f"δ is dimensionless since GM/c^2 and b are both lengths, and halving b would double it to {fmt(2 * ans, 4)} arcsec.")]
    return dict(question=q, steps=steps, checks=checks, final=_final(rng, "δ", fmt(ans), "arcsec"),
                response=f"δ = 4GM/(c^2 b) ≈ {fmt(rad)} rad ≈ {fmt(ans)} arcsec.",
                answer=ans, unit="arcsec", params=dict(M_solar=Ms, b_solar_radii=b_sr))


# Round-robin order; the name is the record's `template` field.
TEMPLATES = {
    "exp_decay": (DE, t_exp_decay),
    "newton_cooling": (DE, t_newton_cooling),
    "damped_oscillator": (DE, t_damped_oscillator),
    "logistic_growth": (DE, t_logistic),
    "projectile_range": (TM, t_projectile_range),
    "pendulum_period": (TM, t_pendulum_period),
    "spring_energy": (TM, t_spring_energy),
    "incline_friction": (TM, t_incline_friction),
    "coulomb_force": (EM, t_coulomb),
    "capacitor_energy": (EM, t_capacitor_energy),
    "rc_charging": (EM, t_rc_charging),
    "solenoid_field": (EM, t_solenoid_field),
    "schwarzschild_radius": (GR, t_schwarzschild_radius),
    "time_dilation": (GR, t_time_dilation),
    "grav_redshift": (GR, t_grav_redshift),
    "light_deflection": (GR, t_light_deflection),
}


# -----------------------------------------------------------------------------
# Public API


def trace_layout(p, rng):
    """The CoT laid out the way long-reasoning models write it: the derivation in two paragraphs, the check in its
    own paragraph, the answer sentence, and a **Final Answer** header over the boxed value as a display equation."""
    steps, cut = p["steps"], rng.randint(1, len(p["steps"]) - 1)
    value = fmt(p["answer"]) + (f"\\ \\text{{{p['unit']}}}" if p["unit"] else "")
    open_, close = _pick(rng, ("\\[", "\\]"), ("$$", "$$"))
    paragraphs = [" ".join(steps[:cut]), " ".join(steps[cut:]), " ".join(p["checks"]), p["final"],
                  f"**Final Answer**\n{open_}\n\\boxed{{{value}}}\n{close}"]
    return "\n\n".join(paragraphs)


def make_record(name, rng):
    """One record of template `name`: derivation steps, then the trigger-led check, then the answer; in about half
    of the records laid out as paragraphs with a display equation (trace_layout), else as one line of sentences."""
    domain, fn = TEMPLATES[name]
    p = fn(rng)
    cot = trace_layout(p, rng) if rng.random() < 0.5 else " ".join(p["steps"] + p["checks"] + [p["final"]])
    return {"domain": domain, "question": p["question"], "CoT": cot, "response": p["response"],
            "template": name, "answer": float(p["answer"]), "unit": p["unit"], "params": p["params"]}


def generate(n: int, seed: int = 0) -> list:
    """n records, deterministic for (n, seed); templates cycle round-robin from a seeded start."""
    rng = random.Random(seed)  # private generator: never touches the global random state
    names = list(TEMPLATES)
    start = rng.randrange(len(names))
    return [make_record(names[(start + i) % len(names)], rng) for i in range(n)]


def write_jsonl(records, path):
    """Write records as JSONL atomically (readers never see a half-written file); returns bytes written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with atomic_write(path, "wb") as f:
        f.write(data)
    return len(data)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate seeded, templated physics chain-of-thought records as JSONL "
                                             "(fields: domain, question, CoT, response, template, answer, unit, params).")
    ap.add_argument("--n", type=int, default=2000, help="number of records to generate (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed; the same (n, seed) gives the same file (default 0)")
    ap.add_argument("--out", default="out/data/synth.jsonl", help="output JSONL path, written atomically (default out/data/synth.jsonl)")
    args = ap.parse_args(argv)
    if args.n < 0:
        ap.error("--n must be >= 0")
    records = generate(args.n, args.seed)
    nbytes = write_jsonl(records, args.out)
    print(f"wrote {len(records)} records, {len({r['template'] for r in records})} templates, {nbytes} bytes to {args.out}")


if __name__ == "__main__":
    main()
