-- cpb.lua: the continuous position bias MLP of DeformableAttention2D as one fused op (DESIGN §4.4).
--
--   bias = fa.cpb(qpos, kpos, w1, b1, w2, b2, w3, b3, opts)
--   gkpos, gw1, gb1, gw2, gb2, gw3, gb3 = fa.cpb_backward(grad_bias, qpos, kpos, w1, b1, w2, b2, w3, b3, opts)
--
-- qpos (N, 2) query positions, kpos (P, M, 2) key positions (x first; P = batch x offset groups), w1 (C, 2),
-- b1 (C), w2 (C, C), b2 (C), w3 (O, C), b3 (O) (nn.Linear layout). With d = qpos[i] - kpos[p, j] and
-- f = sign(d) log(|d| + 1): bias[p, o, i, j] = (w3 relu(w2 relu(w1 f + b1) + b2) + b3)[o], bias (P, O, N, M)
-- (as (B, heads, N, M) it is the reference's '(b g) i j o -> b (g o) i j'). The hidden activations are never
-- stored: the backward recomputes them. No gradient for qpos; f's gradient is 0 at d == 0 (PyTorch's).
-- dtypes: float32 or float64 on the CPU (all the same); on CUDA float32, or bfloat16/float16 weights and biases
-- with float32 positions and a float32 bias (grad_bias float32 or the weights' dtype).
--
-- opts (all optional):
--   deterministic = bool   GPU backward bit-identical run to run (the CPU always is, for any thread count)
--   out = tensor           fa.cpb: write the bias into it (P, O, N, M), contiguous
--   grad_kpos, grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3 = tensor | false
--                          fa.cpb_backward: write into the given tensor, or skip it (false; returns nil)
--
-- Everything is validated once, by the C entry (c/cpb.c); this wrapper converts Lua values and allocates.
local ffi = require 'ffi'
local fa = require 'fastattn'
local E = require 'fastattn.errors'
local C = fa.C

local GRADS = { 'grad_kpos', 'grad_w1', 'grad_b1', 'grad_w2', 'grad_b2', 'grad_w3', 'grad_b3' }
local INPUTS = { 'qpos', 'kpos', 'w1', 'b1', 'w2', 'b2', 'w3', 'b3' }
local FWD_OPTS, BWD_OPTS = { out = true, deterministic = true }, { deterministic = true }
for _, k in ipairs(GRADS) do BWD_OPTS[k] = true end
local RENAME = { out = 'opts.out', deterministic = 'opts.deterministic' }
for _, k in ipairs(GRADS) do RENAME[k] = 'opts.' .. k end

local function c_opts(fn, o)
  local c = ffi.new('fa_cpb_opts')
  c.deterministic = E.boolean(fn, 'opts.deterministic', o.deterministic, true) and 1 or 0
  return c
end

local function check_inputs(fn, x)
  for i, name in ipairs(INPUTS) do E.tensor(fn, name, x[i]) end
end

local function cpb(qpos, kpos, w1, b1, w2, b2, w3, b3, opts)
  local fn = 'fa.cpb'
  check_inputs(fn, { qpos, kpos, w1, b1, w2, b2, w3, b3 })
  local o = E.opts(fn, 'opts', opts, FWD_OPTS)
  local c = c_opts(fn, o)
  local out = E.tensor(fn, 'opts.out', o.out, true)
  if out == nil then -- (P, O, N, M); for inputs of the wrong rank C reports them before it looks at out
    local ok = qpos:dim() == 2 and kpos:dim() == 3 and w3:dim() == 2
    out = fa.empty(ok and { kpos:size(1), w3:size(1), qpos:size(1), kpos:size(2) } or { 0 },
                   { dtype = w1:isCuda() and 'float32' or w1:dtype(), device = w1:device() })
  end
  E.check(C.fa_cpb_forward(out.desc, qpos.desc, kpos.desc, w1.desc, b1.desc, w2.desc, b2.desc, w3.desc, b3.desc, c),
          fn, RENAME)
  return out
end

local function cpb_backward(grad_bias, qpos, kpos, w1, b1, w2, b2, w3, b3, opts)
  local fn = 'fa.cpb_backward'
  E.tensor(fn, 'grad_bias', grad_bias)
  local x = { qpos, kpos, w1, b1, w2, b2, w3, b3 }
  check_inputs(fn, x)
  local o = E.opts(fn, 'opts', opts, BWD_OPTS)
  local c = c_opts(fn, o)
  local g = {}
  for i, key in ipairs(GRADS) do g[i] = E.buffer(fn, 'opts.' .. key, o[key], fa.empty_like, x[i + 1]) end
  local function d(t) return t and t.desc end
  E.check(C.fa_cpb_backward(d(g[1]), d(g[2]), d(g[3]), d(g[4]), d(g[5]), d(g[6]), d(g[7]), grad_bias.desc, qpos.desc,
                            kpos.desc, w1.desc, b1.desc, w2.desc, b2.desc, w3.desc, b3.desc, c), fn, RENAME)
  return g[1], g[2], g[3], g[4], g[5], g[6], g[7]
end

cpb, cpb_backward = E.strict('fa.cpb', cpb), E.strict('fa.cpb_backward', cpb_backward)
rawset(fa, 'cpb', cpb)
rawset(fa, 'cpb_backward', cpb_backward)
return { cpb = cpb, cpb_backward = cpb_backward }
