-- deform_sdpa.lua: fused deformable scaled-dot-product attention (DESIGN §4.5).
--
--   out, lse = fa.deform_sdpa(q, k, v, coords, W, H, scale, opts)
--   gq, gk, gv, gcoords = fa.deform_sdpa_backward(grad_out, q, k, v, coords, W, H, scale, out, lse, opts)
--
-- q, k, v (B, V, heads, H*W, D) (row-major pixels: pixel y*W + x), coords (B, V, H*W, V, S, 2) in [0, 1], x first.
-- Query (b, v1, h, l) attends to the keys and values of every view v2, each sampled at its S points
-- coords[b, v1, l, v2, s] exactly as F.grid_sample(map, 2 coords - 1, mode='bilinear', padding_mode='zeros',
-- align_corners=True) (a tap outside the image reads 0; a point wholly outside gives key 0 and value 0, still a
-- softmax term with score 0): out = softmax(scale q.k) v, (B, V, heads, H*W, D); lse (B, V, heads, H*W), the
-- log-sum-exp of the scores (float32; float64 for float64 inputs). The backward recomputes the samples and gives
-- the gradients of q, k, v and coords.
-- dtypes: float32 or float64 on the CPU (coords as q); on CUDA q, k, v float32, bfloat16 or float16, coords
-- float32. q, k, v (and grad_out, out) may be strided views; coords is copied when it is not contiguous.
--
-- opts (all optional):
--   deterministic = bool   GPU backward bit-identical run to run (the CPU always is, for any thread count)
--   out, lse = tensor      fa.deform_sdpa: write into them (contiguous)
--   grad_q, grad_k, grad_v, grad_coords = tensor | false
--                          fa.deform_sdpa_backward: write into the given tensor (contiguous), or skip (false;
--                          returns nil)
--
-- Everything is validated once, by the C entry (c/deform_sdpa.c); this wrapper converts Lua values and allocates.
local ffi = require 'ffi'
local fa = require 'fastattn'
local E = require 'fastattn.errors'
local C = fa.C

local GRADS = { 'grad_q', 'grad_k', 'grad_v', 'grad_coords' }
local FWD_OPTS, BWD_OPTS = { out = true, lse = true, deterministic = true }, { deterministic = true }
for _, k in ipairs(GRADS) do BWD_OPTS[k] = true end
local RENAME = { out = 'opts.out', lse = 'opts.lse', deterministic = 'opts.deterministic' }
for _, k in ipairs(GRADS) do RENAME[k] = 'opts.' .. k end
local RENAME_BWD = { deterministic = 'opts.deterministic' }
for _, k in ipairs(GRADS) do RENAME_BWD[k] = 'opts.' .. k end

local MAXSIZE = 2 ^ 30

local function c_opts(fn, o)
  local c = ffi.new('fa_deform_sdpa_opts')
  c.deterministic = E.boolean(fn, 'opts.deterministic', o.deterministic, true) and 1 or 0
  return c
end

-- q, k, v, coords, W, H, scale as the C entry takes them
local function args(fn, q, k, v, coords, W, H, scale)
  E.tensor(fn, 'q', q)
  E.tensor(fn, 'k', k)
  E.tensor(fn, 'v', v)
  E.tensor(fn, 'coords', coords)
  E.integer(fn, 'W', W, 1, MAXSIZE)
  E.integer(fn, 'H', H, 1, MAXSIZE)
  E.number(fn, 'scale', scale)
end

local function like(shape, x, dtype)
  return fa.empty(shape, { dtype = dtype or x:dtype(), device = x:device() })
end
local function lse_dtype(q) return q:dtype() == 'float64' and 'float64' or 'float32' end

local function deform_sdpa(q, k, v, coords, W, H, scale, opts)
  local fn = 'fa.deform_sdpa'
  args(fn, q, k, v, coords, W, H, scale)
  local o = E.opts(fn, 'opts', opts, FWD_OPTS)
  local c = c_opts(fn, o)
  local ok = q:dim() == 5 -- for a q of the wrong rank C reports q before it looks at out and lse
  local out = E.tensor(fn, 'opts.out', o.out, true) or like(ok and q:size() or { 0 }, q)
  local lse = E.tensor(fn, 'opts.lse', o.lse, true)
              or like(ok and { q:size(1), q:size(2), q:size(3), q:size(4) } or { 0 }, q, lse_dtype(q))
  E.check(C.fa_deform_sdpa_forward(out.desc, lse.desc, q.desc, k.desc, v.desc, coords.desc, W, H, scale, c), fn, RENAME)
  return out, lse
end

local function deform_sdpa_backward(grad_out, q, k, v, coords, W, H, scale, out, lse, opts)
  local fn = 'fa.deform_sdpa_backward'
  E.tensor(fn, 'grad_out', grad_out)
  args(fn, q, k, v, coords, W, H, scale)
  E.tensor(fn, 'out', out)
  E.tensor(fn, 'lse', lse)
  local o = E.opts(fn, 'opts', opts, BWD_OPTS)
  local c = c_opts(fn, o)
  local x = { q, k, v, coords }
  local g = {}
  for i, key in ipairs(GRADS) do g[i] = E.buffer(fn, 'opts.' .. key, o[key], fa.empty_like, x[i]) end
  local function d(t) return t and t.desc end
  E.check(C.fa_deform_sdpa_backward(d(g[1]), d(g[2]), d(g[3]), d(g[4]), grad_out.desc, q.desc, k.desc, v.desc,
                                    coords.desc, W, H, scale, out.desc, lse.desc, c), fn, RENAME_BWD)
  return g[1], g[2], g[3], g[4]
end

deform_sdpa = E.strict('fa.deform_sdpa', deform_sdpa)
deform_sdpa_backward = E.strict('fa.deform_sdpa_backward', deform_sdpa_backward)
rawset(fa, 'deform_sdpa', deform_sdpa)
rawset(fa, 'deform_sdpa_backward', deform_sdpa_backward)
return { deform_sdpa = deform_sdpa, deform_sdpa_backward = deform_sdpa_backward }
