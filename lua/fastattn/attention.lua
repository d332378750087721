-- attention.lua: the shared attention core (DESIGN §4.2) and triangle attention (§4.3).
--
--   out, lse[, rng] = fa.attention(q, k, v, opts)
--   gq, gk, gv, gbias = fa.attention_backward(grad_out, q, k, v, out, lse, opts)
--   out, lse[, rng] = fa.triangle_attention(q, k, v, bias, mask, opts)
--   gq, gk, gv, gbias = fa.triangle_attention_backward(grad_out, q, k, v, bias, mask, out, lse, opts)
--
-- fa.attention: q (..., H, Lq, D), k and v (..., Hkv, Lk, D) with the same leading dims and H a multiple of Hkv
-- (query head h reads kv head floor(h / (H/Hkv))); any strides with a contiguous last dim. out (..., H, Lq, D),
-- lse (..., H, Lq) (float32; float64 for float64 inputs; -inf for a row whose keys are all masked: it gets mean(V)).
-- fa.triangle_attention: q, k, v (B, H, N, N, D) or strided views of the (B, N, N, H, D) projection, bias
-- (B, H, N, N), mask (B, N, N) with 1 = valid (float, int or bool) or nil:
--   out[b,h,i,j] = softmax_k(scale q[b,h,i,j].k[b,h,i,k] + bias[b,h,j,k], keys with mask[b,i,k] = 1) v[b,h,i,k]
-- It is fa.attention on views (batch (B, i), rows j); out has the layout of q (a view of a (B, N, N, H, D)
-- buffer when q is a view of the projection), lse is (B, H, N, N).
--
-- opts (all optional):
--   bias = tensor          fa.attention: broadcastable to (..., H, Lq, Lk) (missing or size-1 dims broadcast)
--   mask = tensor          fa.attention: broadcastable likewise; nonzero/true = keep (bool, integer or float)
--   scale = number         default D^-1/2
--   mask_scale = number    0 (default): the mask selects keys; > 0: it is added as mask_scale * (mask - 1)
--                          (OpenFold's inf * (mask - 1))
--   dropout = p            0 <= p < 1 on the attention weights (Philox). Without seed the forward draws
--                          (seed, offset) from fa's generator (fa.manualSeed) and returns them as a third value
--                          {seed =, offset =}; give that table to the backward as opts.rng (or give both
--                          calls the same opts.seed and opts.offset)
--   seed, offset = integers, rng = {seed =, offset =}   the dropout stream (see dropout)
--   deterministic = bool   GPU backward bit-identical run to run (the CPU always is, for any thread count)
--   kernel = 'auto' | 'simt' | 'mma' | 'wgmma'   GPU kernel family, for tests and benchmarks
--   out, lse = tensor      forward: write into them
--   grad_q, grad_k, grad_v, grad_bias = tensor | false   backward: write into them, or skip (false; returns nil)
--
-- Everything is validated once, by the C entry (c/attention.c); this wrapper converts Lua values, allocates and
-- (triangle) builds the views.
local ffi = require 'ffi'
local fa = require 'fastattn'
local E = require 'fastattn.errors'
local C = fa.C

local KERNEL = { auto = C.FA_ATTN_KERNEL_AUTO, simt = C.FA_ATTN_KERNEL_SIMT, mma = C.FA_ATTN_KERNEL_MMA,
                 wgmma = C.FA_ATTN_KERNEL_WGMMA }
local KERNEL_NAMES = { 'auto', 'simt', 'mma', 'wgmma' }

local function set(...)
  local s = {}
  for _, k in ipairs({ ... }) do s[k] = true end
  return s
end
local COMMON = { 'scale', 'mask_scale', 'dropout', 'seed', 'offset', 'rng', 'deterministic', 'kernel' }
local FWD_OPTS = set('bias', 'mask', 'out', 'lse', unpack(COMMON))
local BWD_OPTS = set('bias', 'mask', 'grad_q', 'grad_k', 'grad_v', 'grad_bias', unpack(COMMON))
local TRI_FWD_OPTS = set('out', 'lse', unpack(COMMON))
local TRI_BWD_OPTS = set('grad_q', 'grad_k', 'grad_v', 'grad_bias', unpack(COMMON))

-- a dropout stream value: an integer in 0..2^64-1 (a Lua number, or a uint64 cdata)
local function stream_int(fn, name, v)
  if type(v) == 'cdata' and ffi.istype('uint64_t', v) then return v end
  if type(v) == 'number' and v == math.floor(v) and v >= 0 and v < 2 ^ 64 then return v end
  E.argv(fn, name, 'an integer in 0..2^64-1', v)
end

-- the fa_attention_opts of o (names: the option names as the caller spells them); `weights`: how many attention
-- weights (for the stream a forward draws); returns the struct and the rng table to return (or nil)
local function c_opts(fn, o, bias, mask, forward, weights)
  local c = ffi.new('fa_attention_opts')
  c.bias = bias and bias.desc
  c.mask = mask and mask.desc
  local scale = E.number(fn, 'opts.scale', o.scale, true)
  if scale then c.scale, c.has_scale = scale, 1 end
  c.mask_scale = E.number(fn, 'opts.mask_scale', o.mask_scale, true) or 0
  c.dropout = E.number(fn, 'opts.dropout', o.dropout, true) or 0
  c.deterministic = E.boolean(fn, 'opts.deterministic', o.deterministic, true) and 1 or 0
  c.kernel = KERNEL[E.string(fn, 'opts.kernel', o.kernel, KERNEL_NAMES, true) or 'auto']
  local rng
  if o.rng ~= nil then
    if o.seed ~= nil or o.offset ~= nil then
      E.fail(fn, "argument 'opts.rng': expected either opts.rng or opts.seed and opts.offset, got both")
    end
    if type(o.rng) ~= 'table' or fa.isTensor(o.rng) then
      E.argv(fn, 'opts.rng', 'a table {seed =, offset =} (the third result of the forward)', o.rng)
    end
    c.seed = stream_int(fn, 'opts.rng.seed', o.rng.seed)
    c.offset = stream_int(fn, 'opts.rng.offset', o.rng.offset)
  elseif o.seed ~= nil or o.offset ~= nil then
    c.seed = stream_int(fn, 'opts.seed', o.seed)
    c.offset = stream_int(fn, 'opts.offset', o.offset == nil and 0 or o.offset)
  elseif c.dropout > 0 and c.dropout < 1 then
    if not forward then
      E.fail(fn, "argument 'opts.rng': expected the forward's dropout stream (its third result {seed =, offset =}) " ..
             "or opts.seed and opts.offset when opts.dropout > 0, got nil")
    end
    local seed, off = fa._rng_take(math.ceil(weights / 4))
    c.seed, c.offset = seed, off
    rng = { seed = seed, offset = off }
  end
  return c, rng
end

-- the number of attention weights of q (..., H, Lq, D) against k (..., Hkv, Lk, D) (0 for bad ranks: C reports)
local function n_weights(q, k)
  if q:dim() < 3 or k:dim() ~= q:dim() then return 0 end
  return q:numel() / math.max(q:size(q:dim()), 1) * k:size(k:dim() - 1)
end

local function like(shape, x, dtype)
  return fa.empty(shape, { dtype = dtype or x:dtype(), device = x:device() })
end
local function lse_dtype(q) return q:dtype() == 'float64' and 'float64' or 'float32' end
local function drop_last(x)
  local s = x:size()
  s[#s] = nil
  return s
end

local RENAME = { bias = 'opts.bias', mask = 'opts.mask', out = 'opts.out', lse = 'opts.lse', grad_q = 'opts.grad_q',
                 grad_k = 'opts.grad_k', grad_v = 'opts.grad_v', grad_bias = 'opts.grad_bias',
                 scale = 'opts.scale', mask_scale = 'opts.mask_scale', dropout = 'opts.dropout',
                 kernel = 'opts.kernel' }
local RENAME_BWD = {}
for k, v in pairs(RENAME) do RENAME_BWD[k] = v end
RENAME_BWD.out, RENAME_BWD.lse = nil, nil

-- the forward; fn/rename: the caller's function and argument names (o already checked against its options)
local function forward_impl(fn, rename, q, k, v, bias, mask, o)
  local c, rng = c_opts(fn, o, bias, mask, true, n_weights(q, k))
  local ok = q:dim() >= 3
  local out = o.out ~= nil and E.tensor(fn, 'opts.out', o.out) or like(ok and q:size() or { 0 }, q)
  local lse = o.lse ~= nil and E.tensor(fn, 'opts.lse', o.lse) or like(ok and drop_last(q) or { 0 }, q, lse_dtype(q))
  E.check(C.fa_attention_forward(out.desc, lse.desc, q.desc, k.desc, v.desc, c), fn, rename)
  return out, lse, rng
end

local function backward_impl(fn, rename, grad_out, q, k, v, out, lse, bias, mask, o, make)
  local c = c_opts(fn, o, bias, mask, false, 0)
  make = make or {}
  local gq = E.buffer(fn, 'opts.grad_q', o.grad_q, make.q or function() return like(q:size(), q) end)
  local gk = E.buffer(fn, 'opts.grad_k', o.grad_k, make.k or function() return like(k:size(), k) end)
  local gv = E.buffer(fn, 'opts.grad_v', o.grad_v, make.v or function() return like(v:size(), v) end)
  local gb
  if bias ~= nil then
    gb = E.buffer(fn, 'opts.grad_bias', o.grad_bias, make.bias or function() return like(bias:size(), bias) end)
  elseif o.grad_bias then
    gb = E.tensor(fn, 'opts.grad_bias', o.grad_bias)
  end
  E.check(C.fa_attention_backward(gq and gq.desc, gk and gk.desc, gv and gv.desc, gb and gb.desc, grad_out.desc,
                                  q.desc, k.desc, v.desc, out.desc, lse.desc, c), fn, rename)
  return gq, gk, gv, gb
end

local function attention(q, k, v, opts)
  local fn = 'fa.attention'
  E.tensor(fn, 'q', q)
  E.tensor(fn, 'k', k)
  E.tensor(fn, 'v', v)
  local o = E.opts(fn, 'opts', opts, FWD_OPTS)
  local bias, mask = E.tensor(fn, 'opts.bias', o.bias, true), E.tensor(fn, 'opts.mask', o.mask, true)
  return forward_impl(fn, RENAME, q, k, v, bias, mask, o)
end

local function attention_backward(grad_out, q, k, v, out, lse, opts)
  local fn = 'fa.attention_backward'
  E.tensor(fn, 'grad_out', grad_out)
  E.tensor(fn, 'q', q)
  E.tensor(fn, 'k', k)
  E.tensor(fn, 'v', v)
  E.tensor(fn, 'out', out)
  E.tensor(fn, 'lse', lse)
  local o = E.opts(fn, 'opts', opts, BWD_OPTS)
  local bias, mask = E.tensor(fn, 'opts.bias', o.bias, true), E.tensor(fn, 'opts.mask', o.mask, true)
  return backward_impl(fn, RENAME_BWD, grad_out, q, k, v, out, lse, bias, mask, o)
end

---------------------------------------------------------------------------- triangle attention
-- a new tensor of x's shape whose memory order follows x's strides (a (B, H, N, N, D) view of a (B, N, N, H, D)
-- buffer when x is one)
local function empty_layout(x, dtype)
  local n, order = x:dim(), {}
  for d = 1, n do order[d] = d end
  table.sort(order, function(a, b)
    local sa, sb = x:stride(a), x:stride(b)
    if sa ~= sb then return sa > sb end
    return a < b
  end)
  local shape, inv = {}, {}
  for i, d in ipairs(order) do shape[i], inv[d] = x:size(d), i end
  local perm = {}
  for d = 1, n do perm[d] = inv[d] end
  return like(shape, x, dtype):permute(unpack(perm))
end

local function check_dims(fn, name, x, n, what)
  if x:dim() ~= n then E.arg(fn, name, string.format('a %d-D tensor %s', n, what), x) end
end

-- the triangle layout: q, k, v (B, H, N, N, D), bias (B, H, N, N), mask (B, N, N) or nil
local function tri_check(fn, q, k, v, bias, mask)
  E.tensor(fn, 'q', q)
  E.tensor(fn, 'k', k)
  E.tensor(fn, 'v', v)
  E.tensor(fn, 'bias', bias)
  E.tensor(fn, 'mask', mask, true)
  check_dims(fn, 'q', q, 5, '(B, H, N, N, D)')
  check_dims(fn, 'k', k, 5, '(B, H, N, N, D)')
  check_dims(fn, 'v', v, 5, '(B, H, N, N, D)')
  local B, H, N = q:size(1), q:size(2), q:size(3)
  if q:size(4) ~= N then E.arg(fn, 'q', 'a tensor of shape (B, H, N, N, D) (dims 3 and 4 equal)', q) end
  for _, t in ipairs({ { 'k', k }, { 'v', v } }) do
    local x = t[2]
    if x:size(1) ~= B or x:size(2) ~= H or x:size(3) ~= N or x:size(4) ~= N then
      E.arg(fn, t[1], string.format("a tensor of shape (B, H, N, N, D) = (%d, %d, %d, %d, D) as 'q'", B, H, N, N), x)
    end
  end
  if bias:dim() ~= 4 or bias:size(1) ~= B or bias:size(2) ~= H or bias:size(3) ~= N or bias:size(4) ~= N then
    E.arg(fn, 'bias', string.format("a tensor of shape (B, H, N, N) = (%d, %d, %d, %d)", B, H, N, N), bias)
  end
  if mask and (mask:dim() ~= 3 or mask:size(1) ~= B or mask:size(2) ~= N or mask:size(3) ~= N) then
    E.arg(fn, 'mask', string.format("a tensor of shape (B, N, N) = (%d, %d, %d) or nil", B, N, N), mask)
  end
end

-- (B, H, N, N, .) -> (B, i, H, j, .): batch (B, i), heads, rows j
local function tv(x) return x:transpose(2, 3) end
local function tri_bias(bias) return bias:unsqueeze(2) end            -- (B, 1, H, N, N): over i
local function tri_mask(mask) return mask and mask:unsqueeze(3):unsqueeze(3) end -- (B, N, 1, 1, N): over h, j

local TRI_RENAME = { out = 'opts.out', lse = 'opts.lse', grad_q = 'opts.grad_q', grad_k = 'opts.grad_k',
                     grad_v = 'opts.grad_v', grad_bias = 'opts.grad_bias', scale = 'opts.scale',
                     mask_scale = 'opts.mask_scale', dropout = 'opts.dropout', kernel = 'opts.kernel' }

local function triangle_attention(q, k, v, bias, mask, opts)
  local fn = 'fa.triangle_attention'
  tri_check(fn, q, k, v, bias, mask)
  local o = E.opts(fn, 'opts', opts, TRI_FWD_OPTS)
  local out = o.out ~= nil and E.tensor(fn, 'opts.out', o.out) or empty_layout(q)
  local lse = o.lse ~= nil and E.tensor(fn, 'opts.lse', o.lse) or like(drop_last(q), q, lse_dtype(q))
  if out:dim() ~= 5 then E.arg(fn, 'opts.out', 'a 5-D tensor (B, H, N, N, D)', out) end
  if lse:dim() ~= 4 then E.arg(fn, 'opts.lse', 'a 4-D tensor (B, H, N, N)', lse) end
  local fo = { out = tv(out), lse = tv(lse) }
  for key in pairs(TRI_FWD_OPTS) do if key ~= 'out' and key ~= 'lse' then fo[key] = o[key] end end
  local _, _, rng = forward_impl(fn, TRI_RENAME, tv(q), tv(k), tv(v), tri_bias(bias), tri_mask(mask), fo)
  return out, lse, rng
end

local function triangle_attention_backward(grad_out, q, k, v, bias, mask, out, lse, opts)
  local fn = 'fa.triangle_attention_backward'
  tri_check(fn, q, k, v, bias, mask)
  E.tensor(fn, 'grad_out', grad_out)
  E.tensor(fn, 'out', out)
  E.tensor(fn, 'lse', lse)
  check_dims(fn, 'grad_out', grad_out, 5, '(B, H, N, N, D)')
  check_dims(fn, 'out', out, 5, '(B, H, N, N, D)')
  check_dims(fn, 'lse', lse, 4, '(B, H, N, N)')
  local o = E.opts(fn, 'opts', opts, TRI_BWD_OPTS)
  local bo, user = {}, {}
  for key in pairs(TRI_BWD_OPTS) do bo[key] = o[key] end
  -- gradients in the layout of their input, handed to C as the same views as the inputs
  for _, key in ipairs({ 'grad_q', 'grad_k', 'grad_v', 'grad_bias' }) do
    local g = o[key]
    if g == nil then
      local x = ({ grad_q = q, grad_k = k, grad_v = v, grad_bias = bias })[key]
      g = key == 'grad_bias' and like(bias:size(), bias) or empty_layout(x)
    end
    if g then
      E.tensor(fn, 'opts.' .. key, g)
      local nd = key == 'grad_bias' and 4 or 5
      if g:dim() ~= nd then
        E.arg(fn, 'opts.' .. key, string.format('a %d-D tensor %s', nd, nd == 4 and '(B, H, N, N)' or '(B, H, N, N, D)'), g)
      end
      user[key] = g
      bo[key] = key == 'grad_bias' and tri_bias(g) or tv(g)
    end
  end
  backward_impl(fn, TRI_RENAME, tv(grad_out), tv(q), tv(k), tv(v), tv(out), tv(lse), tri_bias(bias), tri_mask(mask), bo)
  return user.grad_q, user.grad_k, user.grad_v, user.grad_bias
end

local M = {
  attention = E.strict('fa.attention', attention),
  attention_backward = E.strict('fa.attention_backward', attention_backward),
  triangle_attention = E.strict('fa.triangle_attention', triangle_attention),
  triangle_attention_backward = E.strict('fa.triangle_attention_backward', triangle_attention_backward),
}
for k, f in pairs(M) do rawset(fa, k, f) end
-- _forward(fn, rename, q, k, v, bias, mask, o) / _backward(fn, rename, grad_out, q, k, v, out, lse, bias, mask, o):
-- the same with messages in a caller's words (o: its options, already checked), for modules
M._forward, M._backward = forward_impl, backward_impl
return M
