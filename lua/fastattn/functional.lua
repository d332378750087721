-- functional.lua: fa.F, the stateless ops (PyTorch's torch.nn.functional). Dims are 1-based and may be
-- negative (-1 = the last), as everywhere in fa.
--
-- One buffer convention (DESIGN §3). A forward takes its output buffers in a last options table:
--   F.linear(input, weight, bias, {out = t})              F.conv2d(input, weight, bias, {stride=, padding=, dilation=, groups=, out=})
--   F.layer_norm(input, normalized_shape, weight, bias, eps, {out=, mean=, rstd=}) -> out, mean, rstd
--   F.softmax(input, dim, {out=}), F.log_softmax(...)    F.gelu, F.relu, F.tanh, F.sigmoid (input, {out=})
--   F.dropout(input, p, training, {out=, mask=}) -> out, mask
--   F.grid_sample(input, grid, {mode='bilinear', padding_mode='zeros'|'border', align_corners=false, out=})
--   F.mse_loss(input, target, {reduction=, out=})       F.cross_entropy(input, target, {ignore_index=, label_smoothing=, reduction=, out=})
-- opts.out is written (it must have the output's size, dtype and device); without it a tensor is allocated.
-- A backward returns the gradients; its options name a buffer per gradient:
--   F.linear_backward(gradOutput, input, weight, {grad_input=, grad_weight=, grad_bias=}) -> gi, gw, gb
--   F.conv2d_backward(gradOutput, input, weight, {stride=, ..., grad_input=, grad_weight=, grad_bias=})
--   F.layer_norm_backward(gradOutput, input, mean, rstd, weight, normalized_shape, {grad_input=, grad_weight=, grad_bias=})
--   F.softmax_backward(gradOutput, output, dim, {grad_input=}), F.log_softmax_backward(...)
--   F.gelu_backward(gradOutput, input, {output=, grad_input=}) (relu, tanh, sigmoid alike; output is the forward's)
--   F.dropout_backward(gradOutput, mask, p, {grad_input=})
--   F.grid_sample_backward(gradOutput, input, grid, {padding_mode=, align_corners=, grad_input=, grad_grid=}) -> gi, gg
--   F.mse_loss_backward(gradLoss, input, target, {reduction=, grad_input=})   (gradLoss: tensor, number or nil = 1)
--   F.cross_entropy_backward(gradLoss, input, target, {ignore_index=, label_smoothing=, reduction=, grad_input=})
-- A tensor given for an input gradient (grad_input, grad_grid) is overwritten; a tensor given for a parameter
-- gradient (grad_weight, grad_bias) is ACCUMULATED into (Torch7's accGradParameters); false skips that
-- gradient (nil is returned for it); nil allocates it.
--
-- Class targets (cross_entropy, nn.CrossEntropyCriterion) are int64 1-based class indices, as Torch7's and
-- as Tensor:argmax returns them; ignore_index (default -100) is compared with the targets as given.
local fa = require 'fastattn'
local E = require 'fastattn.errors'
local C = fa.C

local F = {}
-- the implementations take the function name that messages report first (nn modules pass theirs)
local impl = {}
F._impl = impl

---------------------------------------------------------------------------- argument checks
local function shape_str(x) return fa._shape_str(x, 'x') end

-- C argument names -> the names of the Lua arguments
local RENAME = { x = 'input', grad_x = 'grad_input', grad_out = 'gradOutput', grad_y = 'gradOutput', y = 'output',
                 logits = 'input', grad_logits = 'grad_input', grad_loss = 'gradLoss', loss = 'out' }
-- in fa_softmax_backward, 'out' is the forward's output
local SOFTMAX_BWD_RENAME = setmetatable({ out = 'output' }, { __index = RENAME })
-- rc ~= 0: the C message under fn's name, its argument names (also in "(as 'x')") the Lua ones
local function check(rc, fn) E.check(rc, fn, RENAME) end
F._check = check

local function same_place(fn, name, x, ref, refname)
  if x.desc.device ~= ref.desc.device then
    E.raise(string.format("%s: argument '%s': expected a tensor on %s (as '%s'), got %s", fn, name, ref:device(),
            refname, E.describe(x)))
  end
  if x.desc.dtype ~= ref.desc.dtype then
    E.raise(string.format("%s: argument '%s': expected a %s tensor (as '%s'), got %s", fn, name, ref:dtype(),
            refname, E.describe(x)))
  end
end

local function new_like(shape, x) return fa.empty(shape, { dtype = x.desc.dtype, device = x.desc.device }) end

-- an output of `shape` like x, allocated for fn: a size that cannot be allocated is reported under fn's name,
-- with the size (what: 'the output', ...), and why when the CPU's memory and swap cannot hold it
local function alloc(fn, shape, x, what)
  local n = 1
  for _, v in ipairs(shape) do n = n * v end
  local bytes = n * tonumber(C.fa_dtype_size(x.desc.dtype))
  local ok, t, why = false, nil, ''
  if x.desc.device < 0 and fa._beyond_host(bytes) then
    why = ' (more than the memory and swap of this machine)'
  elseif n < 2 ^ 53 then
    ok, t = pcall(fa.empty, shape, { dtype = x.desc.dtype, device = x.desc.device })
  end
  if not ok then
    E.fail(fn, '%s of size %s (%s bytes) is too large to allocate%s', what, table.concat(shape, 'x'),
           bytes < 2 ^ 53 and string.format('%d', bytes) or string.format('%.4g', bytes), why)
  end
  return t
end

---------------------------------------------------------------------------- aliasing
local overlap = fa._overlaps
-- the inputs of an op that writes the buffers `outs` ({name = tensor or nil}): an input sharing memory with
-- an output is read from a copy (the op would read elements it has already written). Elementwise ops
-- (`elementwise`) may read the very view they write, element by element; for the others (a matrix product,
-- a convolution, sampling) any overlap is copied. An output buffer must have its elements distinct in memory
-- and must not overlap another output. Returns the inputs, in order.
local OUT_ORDER = { 'out', 'mean', 'rstd', 'mask', 'grad_input', 'grad_grid', 'grad_weight', 'grad_bias' }
local function unalias(fn, outs, elementwise, ...)
  local names, bufs = {}, {}
  for _, name in ipairs(OUT_ORDER) do
    local t = outs[name]
    if t then
      fa._check_writable(fn, t, name)
      for i, other in ipairs(bufs) do
        if overlap(t, other) then
          E.raise(string.format("%s: argument '%s': expected a tensor that does not share memory with '%s', got %s",
                  fn, name, names[i], E.describe(t)))
        end
      end
      names[#names + 1], bufs[#bufs + 1] = name, t
    end
  end
  local ins = { ... }
  for k = 1, select('#', ...) do
    local x = ins[k]
    if x ~= nil then
      for _, o in ipairs(bufs) do
        if elementwise then x = fa._unaliased(o, x)
        elseif overlap(o, x) then x = x:clone() end
      end
      ins[k] = x
    end
  end
  return unpack(ins, 1, select('#', ...))
end
F._unalias = unalias

-- opts.out (checked to be a tensor) or a new tensor of `shape` like x
local function out_buf(fn, o, key, shape, like)
  local t = o[key]
  if t == nil then return alloc(fn, shape, like, 'the output') end
  return E.tensor(fn, key, t)
end

-- a gradient buffer from opts: false -> nil (skipped), nil -> allocated (zeroed when `zero`: a parameter
-- gradient, accumulated into), a tensor -> itself
local function grad_buf(fn, o, key, shape, like, zero)
  local g = o[key]
  if g == false then return nil end
  if g == nil then
    g = alloc(fn, shape, like, 'the ' .. key)
    if zero then g:zero() end
    return g
  end
  if not fa.isTensor(g) then E.argv(fn, key, 'a tensor, false or nil', g) end
  return g
end

local function set(...)
  local s = {}
  for _, k in ipairs({ ... }) do s[k] = true end
  return s
end

-- a 1-based dim (negative counts from the end) -> 0-based, or an error naming fn
local function dim0(fn, x, dim)
  local n = x:dim()
  if dim == nil then dim = -1 end
  if type(dim) ~= 'number' or dim ~= math.floor(dim) or dim == 0 or dim > n or dim < -n then
    E.argv(fn, 'dim', string.format('a dimension in 1..%d (or -%d..-1)', n, n), dim)
  end
  return dim < 0 and n + dim or dim - 1
end
F._dim0 = dim0

local REDUCTION = { none = C.FA_REDUCE_NONE, mean = C.FA_REDUCE_MEAN, sum = C.FA_REDUCE_SUM }
local REDUCTION_NAME = { [C.FA_REDUCE_NONE] = 'none', [C.FA_REDUCE_MEAN] = 'mean', [C.FA_REDUCE_SUM] = 'sum' }
F._reduction_name = REDUCTION_NAME
local function reduction_id(fn, r)
  if r == nil or r == true then return C.FA_REDUCE_MEAN end -- Torch7's sizeAverage = true
  if r == false then return C.FA_REDUCE_SUM end
  local id = REDUCTION[r]
  if not id then E.argv(fn, 'reduction', "'none', 'mean' or 'sum'", r) end
  return id
end
F._reduction_id = reduction_id

---------------------------------------------------------------------------- linear
-- input (..., in), weight (out, in), bias (out) or nil -> (..., out)
local function check_linear(fn, input, weight, bias)
  E.tensor(fn, 'input', input)
  E.tensor(fn, 'weight', weight)
  E.tensor(fn, 'bias', bias, true)
  if weight:dim() ~= 2 then E.arg(fn, 'weight', 'a 2-D tensor (out, in)', weight) end
  if input:dim() < 1 or input:size(-1) ~= weight:size(2) then
    E.arg(fn, 'input', string.format('a tensor of size (..., %d)', weight:size(2)), input)
  end
  if bias and (bias:dim() ~= 1 or bias:size(1) ~= weight:size(1)) then
    E.arg(fn, 'bias', string.format('a tensor of size %d', weight:size(1)), bias)
  end
end

local LINEAR = set('out')
function impl.linear(fn, input, weight, bias, opts)
  local o = E.opts(fn, 'opts', opts, LINEAR)
  check_linear(fn, input, weight, bias)
  local shape = input:size()
  shape[#shape] = weight:size(1)
  local out = out_buf(fn, o, 'out', shape, input)
  input, weight, bias = unalias(fn, { out = out }, false, input, weight, bias)
  check(C.fa_linear_forward(out.desc, input:contiguous().desc, weight.desc, bias and bias.desc or nil), fn)
  return out
end

local LINEAR_BWD = set('grad_input', 'grad_weight', 'grad_bias')
function impl.linear_backward(fn, gradOutput, input, weight, opts)
  local o = E.opts(fn, 'opts', opts, LINEAR_BWD)
  E.tensor(fn, 'gradOutput', gradOutput)
  check_linear(fn, input, weight, nil)
  local gi = grad_buf(fn, o, 'grad_input', input:size(), input, false)
  local gw = grad_buf(fn, o, 'grad_weight', weight:size(), weight, true)
  local gb = grad_buf(fn, o, 'grad_bias', { weight:size(1) }, weight, true)
  gradOutput, input, weight = unalias(fn, { grad_input = gi, grad_weight = gw, grad_bias = gb }, false, gradOutput,
                                      input, weight)
  check(C.fa_linear_backward(gi and gi.desc or nil, gw and gw.desc or nil, gb and gb.desc or nil,
    gradOutput:contiguous().desc, input:contiguous().desc, weight.desc), fn)
  return gi, gw, gb
end

---------------------------------------------------------------------------- conv2d
-- the fields of fa_conv2d_params are int32
local function int32(v) return type(v) == 'number' and v == math.floor(v) and v >= -2^31 and v < 2^31 end
-- an integer >= lo that fits the int32 fields of fa_conv2d_params
local function one(fn, name, v, lo, alt)
  if not int32(v) or v < lo then
    local big = type(v) == 'number' and v == math.floor(v) and v >= 2 ^ 31
    E.argv(fn, name, big and string.format('an integer in %d..%d%s', lo, 2 ^ 31 - 1, alt)
           or string.format('an integer >= %d%s', lo, alt), v)
  end
  return v
end
-- a number or {h, w} of integers >= lo (each element checked, so a message names the bad one: 'stride[2]')
local function pair(fn, name, v, default, lo)
  if v == nil then return default, default end
  if type(v) == 'table' and not fa.isTensor(v) and #v >= 1 and #v <= 2 then
    for k in pairs(v) do
      if k ~= 1 and k ~= 2 then E.argv(fn, name, 'an integer or {h, w}', v) end
    end
    local a = one(fn, name .. '[1]', v[1], lo, '')
    local b = v[2] == nil and a or one(fn, name .. '[2]', v[2], lo, '')
    return a, b
  end
  one(fn, name, v, lo, ' or {h, w}')
  return v, v
end

-- stride/padding/dilation/groups -> fa_conv2d_params (padding may be 'valid' or, for odd effective kernels
-- and stride 1, 'same')
local function conv_params(fn, kh, kw, o)
  local p = require('ffi').new('fa_conv2d_params')
  p.stride_h, p.stride_w = pair(fn, 'stride', o.stride, 1, 1)
  p.dilation_h, p.dilation_w = pair(fn, 'dilation', o.dilation, 1, 1)
  local padding = o.padding
  if padding == 'valid' then padding = 0 end
  if padding == 'same' then
    local eh, ew = p.dilation_h * (kh - 1), p.dilation_w * (kw - 1)
    if eh % 2 ~= 0 or ew % 2 ~= 0 or p.stride_h ~= 1 or p.stride_w ~= 1 then
      E.fail(fn, "argument 'padding': 'same' needs stride 1 and an odd effective kernel size")
    end
    padding = { eh / 2, ew / 2 }
  end
  if type(padding) == 'string' then E.argv(fn, 'padding', "an integer, {h, w}, 'valid' or 'same'", padding) end
  p.pad_h, p.pad_w = pair(fn, 'padding', padding, 0, 0)
  p.groups = E.integer(fn, 'groups', o.groups == nil and 1 or o.groups, 1, 2^31 - 1)
  return p
end
F._conv_params = conv_params

-- the output size of a conv2d, after checking the shapes
local function conv_output_size(fn, input, weight, bias, p)
  E.tensor(fn, 'input', input)
  E.tensor(fn, 'weight', weight)
  E.tensor(fn, 'bias', bias, true)
  if weight:dim() ~= 4 then E.arg(fn, 'weight', 'a 4-D tensor (out, in/groups, kh, kw)', weight) end
  local O, Cg, kh, kw = weight:size(1), weight:size(2), weight:size(3), weight:size(4)
  local g = p.groups
  if input:dim() ~= 4 or input:size(2) ~= Cg * g then
    E.arg(fn, 'input', string.format('a tensor of size (N, %d, H, W)', Cg * g), input)
  end
  if O % g ~= 0 then E.argv(fn, 'groups', string.format('a divisor of the %d output channels', O), g) end
  if bias and (bias:dim() ~= 1 or bias:size(1) ~= O) then
    E.arg(fn, 'bias', string.format('a tensor of size %d', O), bias)
  end
  local H, W = input:size(3), input:size(4)
  local Ho = math.floor((H + 2 * p.pad_h - p.dilation_h * (kh - 1) - 1) / p.stride_h) + 1
  local Wo = math.floor((W + 2 * p.pad_w - p.dilation_w * (kw - 1) - 1) / p.stride_w) + 1
  if Ho < 1 or Wo < 1 then F._kernel_too_large(fn, input, kh, kw, p) end
  return { input:size(1), O, Ho, Wo }
end
-- the message for an input smaller than the (dilated) kernel
function F._kernel_too_large(fn, input, kh, kw, p)
  local eh, ew = p.dilation_h * (kh - 1) + 1, p.dilation_w * (kw - 1) + 1
  E.arg(fn, 'input', string.format('a tensor of size (N, C, H, W) with H + 2*padding >= %d and W + 2*padding >= %d ' ..
        '(the dilated kernel %dx%d, padding %dx%d)', eh, ew, eh, ew, p.pad_h, p.pad_w), input)
end

local function conv_weight(fn, weight)
  E.tensor(fn, 'weight', weight)
  if weight:dim() ~= 4 then E.arg(fn, 'weight', 'a 4-D tensor (out, in/groups, kh, kw)', weight) end
end

local CONV = set('stride', 'padding', 'dilation', 'groups', 'out')
-- o: the checked options table; p: prepared fa_conv2d_params (nn.Conv2d keeps its own) or nil
function impl.conv2d(fn, input, weight, bias, o, p)
  conv_weight(fn, weight)
  p = p or conv_params(fn, weight:size(3), weight:size(4), o)
  local shape = conv_output_size(fn, input, weight, bias, p)
  local out = out_buf(fn, o, 'out', shape, input)
  input, weight, bias = unalias(fn, { out = out }, false, input, weight, bias)
  check(C.fa_conv2d_forward(out.desc, input.desc, weight.desc, bias and bias.desc or nil, p), fn)
  return out
end

local CONV_BWD = set('stride', 'padding', 'dilation', 'groups', 'grad_input', 'grad_weight', 'grad_bias')
function impl.conv2d_backward(fn, gradOutput, input, weight, o, p)
  E.tensor(fn, 'gradOutput', gradOutput)
  conv_weight(fn, weight)
  p = p or conv_params(fn, weight:size(3), weight:size(4), o)
  conv_output_size(fn, input, weight, nil, p)
  local gi = grad_buf(fn, o, 'grad_input', input:size(), input, false)
  local gw = grad_buf(fn, o, 'grad_weight', weight:size(), weight, true)
  local gb = grad_buf(fn, o, 'grad_bias', { weight:size(1) }, weight, true)
  gradOutput, input, weight = unalias(fn, { grad_input = gi, grad_weight = gw, grad_bias = gb }, false, gradOutput,
                                      input, weight)
  check(C.fa_conv2d_backward(gi and gi.desc or nil, gw and gw.desc or nil, gb and gb.desc or nil, gradOutput.desc,
    input.desc, weight.desc, p), fn)
  return gi, gw, gb
end

---------------------------------------------------------------------------- layer_norm
-- normalized_shape: a size or a table of the trailing sizes; returns their product
local function norm_size(fn, input, normalized_shape)
  local ns = type(normalized_shape) == 'number' and { normalized_shape } or normalized_shape
  if type(ns) ~= 'table' or fa.isTensor(ns) then E.argv(fn, 'normalized_shape', 'a size or a table of sizes', normalized_shape) end
  for i = 1, #ns do E.integer(fn, 'normalized_shape[' .. i .. ']', ns[i], 0) end
  local n, d = 1, input:dim()
  local ok = #ns <= d
  for i = 1, #ns do
    n = n * ns[i]
    if ok and input:size(d - #ns + i) ~= ns[i] then ok = false end
  end
  if not ok then
    E.arg(fn, 'input', string.format('a tensor of size (..., %s) (normalized_shape)', table.concat(ns, ', ')), input)
  end
  return n
end
F._norm_size = norm_size

-- the dtype of the saved statistics: float64 for float64 input, float32 otherwise
local function stat_dtype(x) return x.desc.dtype == C.FA_FLOAT64 and C.FA_FLOAT64 or C.FA_FLOAT32 end
F._stat_dtype = stat_dtype

local LN = set('eps', 'out', 'mean', 'rstd')
function impl.layer_norm(fn, input, normalized_shape, weight, bias, eps, opts)
  if type(eps) == 'table' then opts, eps = eps, eps.eps end
  local o = E.opts(fn, 'opts', opts, LN)
  E.tensor(fn, 'input', input)
  E.tensor(fn, 'weight', weight, true)
  E.tensor(fn, 'bias', bias, true)
  eps = E.number(fn, 'eps', eps == nil and 1e-5 or eps)
  local n = norm_size(fn, input, normalized_shape)
  if weight and weight:numel() ~= n then E.arg(fn, 'weight', string.format('a tensor of %d elements', n), weight) end
  if bias and bias:numel() ~= n then E.arg(fn, 'bias', string.format('a tensor of %d elements', n), bias) end
  local rows = n > 0 and input:numel() / n or 0
  local sd = { dtype = stat_dtype(input), device = input.desc.device }
  local out = out_buf(fn, o, 'out', input:size(), input)
  local mean = o.mean == nil and fa.empty({ rows }, sd) or E.tensor(fn, 'mean', o.mean)
  local rstd = o.rstd == nil and fa.empty({ rows }, sd) or E.tensor(fn, 'rstd', o.rstd)
  -- C takes weight and bias as 1-D tensors of n elements
  local w1 = weight and (weight:dim() == 1 and weight or weight:view(n))
  local b1 = bias and (bias:dim() == 1 and bias or bias:view(n))
  input, w1, b1 = unalias(fn, { out = out, mean = mean, rstd = rstd }, true, input, w1, b1)
  check(C.fa_layernorm_forward(out.desc, mean.desc, rstd.desc, input.desc, w1 and w1.desc or nil,
    b1 and b1.desc or nil, n, eps), fn)
  return out, mean, rstd
end

local LN_BWD = set('grad_input', 'grad_weight', 'grad_bias')
function impl.layer_norm_backward(fn, gradOutput, input, mean, rstd, weight, normalized_shape, opts)
  local o = E.opts(fn, 'opts', opts, LN_BWD)
  E.tensor(fn, 'gradOutput', gradOutput)
  E.tensor(fn, 'input', input)
  E.tensor(fn, 'mean', mean)
  E.tensor(fn, 'rstd', rstd)
  E.tensor(fn, 'weight', weight, true)
  local n = norm_size(fn, input, normalized_shape)
  if weight and weight:numel() ~= n then E.arg(fn, 'weight', string.format('a tensor of %d elements', n), weight) end
  local pshape = weight and weight:size() or { n }
  local gi = grad_buf(fn, o, 'grad_input', input:size(), input, false)
  local gw = grad_buf(fn, o, 'grad_weight', pshape, weight or input, true)
  local gb = grad_buf(fn, o, 'grad_bias', pshape, weight or input, true)
  local function flat(t) return t and (t:dim() == 1 and t or t:view(n)) end
  local w1, gw1, gb1 = flat(weight), flat(gw), flat(gb)
  gradOutput, input, mean, rstd, w1 = unalias(fn, { grad_input = gi, grad_weight = gw1, grad_bias = gb1 }, true,
                                              gradOutput, input, mean, rstd, w1)
  check(C.fa_layernorm_backward(gi and gi.desc or nil, gw1 and gw1.desc or nil, gb1 and gb1.desc or nil,
    gradOutput.desc, input.desc, mean.desc, rstd.desc, w1 and w1.desc or nil, n), fn)
  return gi, gw, gb
end

---------------------------------------------------------------------------- softmax
local OUT = set('out')
local GRAD_INPUT = set('grad_input')
function impl.softmax(fn, log, input, dim, opts)
  if type(dim) == 'table' and opts == nil then dim, opts = nil, dim end
  local o = E.opts(fn, 'opts', opts, OUT)
  E.tensor(fn, 'input', input)
  local d = dim0(fn, input, dim)
  local out = out_buf(fn, o, 'out', input:size(), input)
  input = unalias(fn, { out = out }, true, input)
  check(C.fa_softmax_forward(out.desc, input.desc, d, log and 1 or 0), fn)
  return out
end
function impl.softmax_backward(fn, log, gradOutput, output, dim, opts)
  if type(dim) == 'table' and opts == nil then dim, opts = nil, dim end
  local o = E.opts(fn, 'opts', opts, GRAD_INPUT)
  E.tensor(fn, 'gradOutput', gradOutput)
  E.tensor(fn, 'output', output)
  local d = dim0(fn, output, dim)
  local gi = o.grad_input == nil and new_like(output:size(), output) or E.tensor(fn, 'grad_input', o.grad_input)
  gradOutput, output = unalias(fn, { grad_input = gi }, true, gradOutput, output)
  local rc = C.fa_softmax_backward(gi.desc, gradOutput.desc, output.desc, d, log and 1 or 0)
  E.check(rc, fn, SOFTMAX_BWD_RENAME)
  return gi
end

---------------------------------------------------------------------------- activations
local UNARY_BWD = set('output', 'grad_input')
function impl.unary(fn, op, input, opts)
  local o = E.opts(fn, 'opts', opts, OUT)
  E.tensor(fn, 'input', input)
  if not input:isFloatingPoint() then E.arg(fn, 'input', 'a floating-point tensor', input) end
  local out = out_buf(fn, o, 'out', input:size(), input)
  input = unalias(fn, { out = out }, true, input)
  check(C.fa_unary_forward(op, out.desc, input.desc), fn)
  return out
end
-- grad_input = f'(input) * gradOutput; opts.output (the forward's output) is used where the derivative
-- reads it (relu, tanh, sigmoid), so input may then be nil
function impl.unary_backward(fn, op, gradOutput, input, opts)
  local o = E.opts(fn, 'opts', opts, UNARY_BWD)
  E.tensor(fn, 'gradOutput', gradOutput)
  E.tensor(fn, 'input', input, o.output ~= nil)
  local y = E.tensor(fn, 'output', o.output, true)
  -- the forward's input and output have gradOutput's size (C checks dtypes and devices)
  for _, a in ipairs({ { 'input', input }, { 'output', y } }) do
    if a[2] and not a[2]:isSameSizeAs(gradOutput) then
      E.arg(fn, a[1], string.format("a tensor of size %s (as 'gradOutput')", shape_str(gradOutput)), a[2])
    end
  end
  local gi = o.grad_input == nil and new_like(gradOutput:size(), gradOutput) or E.tensor(fn, 'grad_input', o.grad_input)
  gradOutput, input, y = unalias(fn, { grad_input = gi }, true, gradOutput, input, y)
  check(C.fa_unary_backward(op, gi.desc, gradOutput.desc, input and input.desc or nil, y and y.desc or nil), fn)
  return gi
end
local UNARY = { gelu = C.FA_GELU, relu = C.FA_RELU, tanh = C.FA_TANH, sigmoid = C.FA_SIGMOID }
F._unary_op = UNARY
for name, op in pairs(UNARY) do
  local fn, fnb = 'fa.F.' .. name, 'fa.F.' .. name .. '_backward'
  F[name] = function(input, opts) return impl.unary(fn, op, input, opts) end
  F[name .. '_backward'] = function(gradOutput, input, opts) return impl.unary_backward(fnb, op, gradOutput, input, opts) end
end

---------------------------------------------------------------------------- dropout
local function check_p(fn, p)
  if type(p) ~= 'number' or not (p >= 0 and p <= 1) then E.argv(fn, 'p', 'a probability in [0, 1]', p) end
  return p
end
F._check_p = check_p

-- the mask comes from fa's RNG stream (fa.manualSeed makes it reproducible). Without training, or for
-- p = 0, nothing is dropped: the output is the input itself (copied into opts.out when given), mask nil.
local DROPOUT = set('out', 'mask')
function impl.dropout(fn, input, p, training, opts)
  local o = E.opts(fn, 'opts', opts, DROPOUT)
  E.tensor(fn, 'input', input)
  p = check_p(fn, p == nil and 0.5 or p)
  E.boolean(fn, 'training', training, true)
  if training == false or p == 0 then
    if o.out ~= nil then return E.tensor(fn, 'out', o.out):copy(input), nil end
    return input, nil
  end
  local out = out_buf(fn, o, 'out', input:size(), input)
  local mask = o.mask == nil and fa.empty(input:size(), { dtype = C.FA_BOOL, device = input.desc.device })
               or E.tensor(fn, 'mask', o.mask)
  if p == 1 then
    check(C.fa_fill(mask.desc, 0), fn)
    check(C.fa_fill(out.desc, 0), fn)
    return out, mask
  end
  input = unalias(fn, { out = out, mask = mask }, true, input)
  local seed, off = fa._rng_take(input:numel())
  check(C.fa_dropout_forward(out.desc, mask.desc, input.desc, p, seed, off), fn)
  return out, mask
end
function impl.dropout_backward(fn, gradOutput, mask, p, opts)
  local o = E.opts(fn, 'opts', opts, GRAD_INPUT)
  E.tensor(fn, 'gradOutput', gradOutput)
  E.tensor(fn, 'mask', mask)
  p = check_p(fn, p == nil and 0.5 or p)
  local gi = o.grad_input == nil and new_like(gradOutput:size(), gradOutput) or E.tensor(fn, 'grad_input', o.grad_input)
  gradOutput, mask = unalias(fn, { grad_input = gi }, true, gradOutput, mask)
  if p == 1 then check(C.fa_fill(gi.desc, 0), fn); return gi end
  check(C.fa_dropout_backward(gi.desc, gradOutput.desc, mask.desc, p), fn)
  return gi
end

---------------------------------------------------------------------------- grid_sample
local PADDING = { zeros = C.FA_PAD_ZEROS, border = C.FA_PAD_BORDER }
-- {mode='bilinear', padding_mode='zeros'|'border', align_corners=false} -> padding id, align_corners 0/1
local function grid_sample_opts(fn, o)
  E.string(fn, 'mode', o.mode, { 'bilinear' }, true)
  local pm = E.string(fn, 'padding_mode', o.padding_mode, { 'zeros', 'border' }, true) or 'zeros'
  local ac = E.boolean(fn, 'align_corners', o.align_corners, true)
  return PADDING[pm], ac and 1 or 0
end
F._grid_sample_opts = grid_sample_opts

local function grid_sample_check(fn, input, grid)
  E.tensor(fn, 'input', input)
  E.tensor(fn, 'grid', grid)
  if input:dim() ~= 4 then E.arg(fn, 'input', 'a 4-D tensor (N, C, H, W)', input) end
  if grid:dim() ~= 4 or grid:size(4) ~= 2 or grid:size(1) ~= input:size(1) then
    E.arg(fn, 'grid', string.format('a tensor of size (%d, Ho, Wo, 2)', input:size(1)), grid)
  end
  same_place(fn, 'grid', grid, input, 'input')
  return { input:size(1), input:size(2), grid:size(2), grid:size(3) }
end

local GRID = set('mode', 'padding_mode', 'align_corners', 'out')
-- o: the checked options; pad, ac: prepared by nn.GridSample (or nil)
function impl.grid_sample(fn, input, grid, o, pad, ac)
  if pad == nil then pad, ac = grid_sample_opts(fn, o) end
  local shape = grid_sample_check(fn, input, grid)
  local out = out_buf(fn, o, 'out', shape, input)
  input, grid = unalias(fn, { out = out }, false, input, grid)
  check(C.fa_grid_sample_forward(out.desc, input.desc, grid.desc, pad, ac), fn)
  return out
end
local GRID_BWD = set('mode', 'padding_mode', 'align_corners', 'grad_input', 'grad_grid')
function impl.grid_sample_backward(fn, gradOutput, input, grid, o, pad, ac)
  if pad == nil then pad, ac = grid_sample_opts(fn, o) end
  E.tensor(fn, 'gradOutput', gradOutput)
  grid_sample_check(fn, input, grid)
  local gi = grad_buf(fn, o, 'grad_input', input:size(), input, false)
  local gg = grad_buf(fn, o, 'grad_grid', grid:size(), grid, false)
  gradOutput, input, grid = unalias(fn, { grad_input = gi, grad_grid = gg }, false, gradOutput, input, grid)
  check(C.fa_grid_sample_backward(gi and gi.desc or nil, gg and gg.desc or nil, gradOutput.desc, input.desc,
    grid.desc, pad, ac), fn)
  return gi, gg
end

---------------------------------------------------------------------------- losses
local function check_mse(fn, input, target)
  E.tensor(fn, 'input', input)
  E.tensor(fn, 'target', target)
  if not input:isSameSizeAs(target) then
    E.arg(fn, 'target', string.format('a tensor of size %s (as the input)', shape_str(input)), target)
  end
  same_place(fn, 'target', target, input, 'input')
end

-- a loss gradient: a tensor, a number or nil (= 1), as a tensor of `shape` (a number or nil: a 0-D
-- tensor for mean/sum; for none, nil gives ones of `shape`)
local function grad_loss(fn, g, shape, like)
  if fa.isTensor(g) then return g end
  local v = E.number(fn, 'gradLoss', g == nil and 1 or g)
  if #shape == 0 or g ~= nil then
    if #shape > 0 then E.argv(fn, 'gradLoss', 'a tensor of size ' .. table.concat(shape, 'x') .. " (reduction 'none')", g) end
    return fa.full({}, v, { dtype = like.desc.dtype, device = like.desc.device })
  end
  return fa.ones(shape, { dtype = like.desc.dtype, device = like.desc.device })
end
F._grad_loss = grad_loss

local MSE = set('reduction', 'out')
local function loss_opts(fn, r, known)
  if type(r) == 'table' and not fa.isTensor(r) then return E.opts(fn, 'opts', r, known) end
  return { reduction = r }
end
function impl.mse_loss(fn, input, target, reduction)
  local o = loss_opts(fn, reduction, MSE)
  check_mse(fn, input, target)
  local red = reduction_id(fn, o.reduction)
  local loss = out_buf(fn, o, 'out', red == C.FA_REDUCE_NONE and input:size() or {}, input)
  input, target = unalias(fn, { out = loss }, true, input, target)
  check(C.fa_mse_forward(loss.desc, input.desc, target.desc, red), fn)
  return loss
end
local MSE_BWD = set('reduction', 'grad_input')
function impl.mse_loss_backward(fn, gradLoss, input, target, reduction)
  local o = loss_opts(fn, reduction, MSE_BWD)
  check_mse(fn, input, target)
  local red = reduction_id(fn, o.reduction)
  local g = grad_loss(fn, gradLoss, red == C.FA_REDUCE_NONE and input:size() or {}, input)
  local gi = o.grad_input == nil and new_like(input:size(), input) or E.tensor(fn, 'grad_input', o.grad_input)
  g, input, target = unalias(fn, { grad_input = gi }, true, g, input, target)
  check(C.fa_mse_backward(gi.desc, g.desc, input.desc, target.desc, red), fn)
  return gi
end

-- cross_entropy: shape checks; returns the shape of an unreduced loss
local function check_cross_entropy(fn, input, target)
  E.tensor(fn, 'input', input)
  E.tensor(fn, 'target', target)
  if not input:isFloatingPoint() then E.arg(fn, 'input', 'a floating-point tensor of logits', input) end
  if input:dim() < 2 then E.arg(fn, 'input', 'a tensor of size (N, C) or (N, C, d1, ...)', input) end
  if target.desc.dtype ~= C.FA_INT64 then E.arg(fn, 'target', 'an int64 tensor of class indices (1-based)', target) end
  local want = input:size()
  table.remove(want, 2)
  local ok = target:dim() == #want
  for i = 1, #want do ok = ok and target:size(i) == want[i] end
  if not ok then
    E.arg(fn, 'target', string.format("a tensor of size %s (the input's size without the class dim)",
          #want == 0 and '[]' or table.concat(want, 'x')), target)
  end
  if target.desc.device ~= input.desc.device then
    E.arg(fn, 'target', string.format("a tensor on %s (as 'input')", input:device()), target)
  end
  return want
end

local CE_KEYS = { 'ignore_index', 'label_smoothing', 'reduction' }
local CE = set('ignore_index', 'label_smoothing', 'reduction', 'out')
local CE_BWD = set('ignore_index', 'label_smoothing', 'reduction', 'grad_input')
-- opts -> ignore_index (as given), label_smoothing, reduction id
local function ce_opts(fn, o)
  local ls = o.label_smoothing == nil and 0 or o.label_smoothing
  if type(ls) ~= 'number' or not (ls >= 0 and ls <= 1) then E.argv(fn, 'label_smoothing', 'a number in [0, 1]', ls) end
  local ii = E.integer(fn, 'ignore_index', o.ignore_index == nil and -100 or o.ignore_index)
  return ii, ls, reduction_id(fn, o.reduction)
end
F._cross_entropy_opts = function(fn, o)
  E.opts(fn, 'opts', o, set(unpack(CE_KEYS)))
  return ce_opts(fn, o or {})
end

-- 1-based targets -> 0-based, into buf (reused when it fits)
local function targets0(fn, target, buf)
  if buf and buf.desc.device == target.desc.device then buf = buf:resize(target:size())
  else buf = fa.empty(target:size(), { dtype = C.FA_INT64, device = target.desc.device }) end
  check(C.fa_scale_forward(buf.desc, target.desc, 1, -1), fn)
  return buf
end

-- C checks the (shifted) targets and reports the 0-based index and position; say it in the user's terms
local function ce_check(rc, fn, ii)
  if rc == 0 then return end
  local msg = require('ffi').string(C.fa_last_error())
  local t, pos, nc = msg:match("class index (%-?%d+) at position (%d+) is out of range %[0, (%d+)%)")
  if t then
    E.fail(fn, "argument 'target': class %s at position %s is out of range 1..%s (ignore_index %s)",
           tostring(tonumber(t) + 1), tostring(tonumber(pos) + 1), nc, E.describe(ii))
  end
  E.check(rc, fn, RENAME)
end

-- tbuf: a kept buffer for the 0-based targets (nn.CrossEntropyCriterion's); returns loss, the buffer
function impl.cross_entropy(fn, input, target, opts, tbuf)
  if type(opts) == 'string' then opts = { reduction = opts } end
  local o = E.opts(fn, 'opts', opts, CE)
  local ii, ls, red = ce_opts(fn, o)
  local want = check_cross_entropy(fn, input, target)
  local loss = out_buf(fn, o, 'out', red == C.FA_REDUCE_NONE and want or {}, input)
  input = unalias(fn, { out = loss }, true, input)
  tbuf = targets0(fn, target, tbuf)
  ce_check(C.fa_cross_entropy_forward(loss.desc, input.desc, tbuf.desc, ii - 1, ls, red), fn, ii)
  return loss, tbuf
end
function impl.cross_entropy_backward(fn, gradLoss, input, target, opts, tbuf)
  if type(opts) == 'string' then opts = { reduction = opts } end
  local o = E.opts(fn, 'opts', opts, CE_BWD)
  local ii, ls, red = ce_opts(fn, o)
  local want = check_cross_entropy(fn, input, target)
  local g = grad_loss(fn, gradLoss, red == C.FA_REDUCE_NONE and want or {}, input)
  local gi = o.grad_input == nil and new_like(input:size(), input) or E.tensor(fn, 'grad_input', o.grad_input)
  g, input = unalias(fn, { grad_input = gi }, true, g, input)
  tbuf = targets0(fn, target, tbuf)
  ce_check(C.fa_cross_entropy_backward(gi.desc, g.desc, input.desc, tbuf.desc, ii - 1, ls, red), fn, ii)
  return gi, tbuf
end

---------------------------------------------------------------------------- the public functions
function F.linear(input, weight, bias, opts) return impl.linear('fa.F.linear', input, weight, bias, opts) end
function F.linear_backward(gradOutput, input, weight, opts)
  return impl.linear_backward('fa.F.linear_backward', gradOutput, input, weight, opts)
end

-- F.conv2d(input, weight, bias, stride, padding, dilation, groups[, opts]) as PyTorch's, or
-- F.conv2d(input, weight, bias, {stride=, padding=, dilation=, groups=, out=})
local function conv_opts(fn, known, stride, padding, dilation, groups, opts)
  if type(stride) == 'table' and not fa.isTensor(stride) and stride[1] == nil and padding == nil then
    return E.opts(fn, 'opts', stride, known)
  end
  local o = E.opts(fn, 'opts', opts, OUT)
  return { stride = stride, padding = padding, dilation = dilation, groups = groups, out = o.out }
end
function F.conv2d(input, weight, bias, stride, padding, dilation, groups, opts)
  local fn = 'fa.F.conv2d'
  return impl.conv2d(fn, input, weight, bias, conv_opts(fn, CONV, stride, padding, dilation, groups, opts))
end
function F.conv2d_backward(gradOutput, input, weight, opts)
  local fn = 'fa.F.conv2d_backward'
  return impl.conv2d_backward(fn, gradOutput, input, weight, E.opts(fn, 'opts', opts, CONV_BWD))
end

function F.layer_norm(input, normalized_shape, weight, bias, eps, opts)
  return impl.layer_norm('fa.F.layer_norm', input, normalized_shape, weight, bias, eps, opts)
end
function F.layer_norm_backward(gradOutput, input, mean, rstd, weight, normalized_shape, opts)
  return impl.layer_norm_backward('fa.F.layer_norm_backward', gradOutput, input, mean, rstd, weight, normalized_shape, opts)
end

function F.softmax(input, dim, opts) return impl.softmax('fa.F.softmax', false, input, dim, opts) end
function F.log_softmax(input, dim, opts) return impl.softmax('fa.F.log_softmax', true, input, dim, opts) end
function F.softmax_backward(gradOutput, output, dim, opts)
  return impl.softmax_backward('fa.F.softmax_backward', false, gradOutput, output, dim, opts)
end
function F.log_softmax_backward(gradOutput, output, dim, opts)
  return impl.softmax_backward('fa.F.log_softmax_backward', true, gradOutput, output, dim, opts)
end

function F.dropout(input, p, training, opts)
  if type(training) == 'table' and opts == nil then training, opts = nil, training end
  return impl.dropout('fa.F.dropout', input, p, training, opts)
end
function F.dropout_backward(gradOutput, mask, p, opts)
  return impl.dropout_backward('fa.F.dropout_backward', gradOutput, mask, p, opts)
end

-- F.grid_sample(input, grid, {mode=, padding_mode=, align_corners=, out=}) or PyTorch's positional
-- F.grid_sample(input, grid, mode, padding_mode, align_corners); bilinear only.
-- input (N, C, H, W), grid (N, Ho, Wo, 2) with (x, y) in [-1, 1] -> (N, C, Ho, Wo)
function F.grid_sample(input, grid, mode, padding_mode, align_corners)
  local fn = 'fa.F.grid_sample'
  local o = type(mode) == 'table' and E.opts(fn, 'opts', mode, GRID)
            or { mode = mode, padding_mode = padding_mode, align_corners = align_corners }
  return impl.grid_sample(fn, input, grid, o)
end
fa.grid_sample = F.grid_sample
function F.grid_sample_backward(gradOutput, input, grid, opts)
  local fn = 'fa.F.grid_sample_backward'
  return impl.grid_sample_backward(fn, gradOutput, input, grid, E.opts(fn, 'opts', opts, GRID_BWD))
end

-- F.mse_loss(input, target, reduction = 'mean' | {reduction=, out=}) -> a 0-D tensor (mean, sum) or
-- input's shape (none)
function F.mse_loss(input, target, reduction) return impl.mse_loss('fa.F.mse_loss', input, target, reduction) end
function F.mse_loss_backward(gradLoss, input, target, reduction)
  return impl.mse_loss_backward('fa.F.mse_loss_backward', gradLoss, input, target, reduction)
end

-- F.cross_entropy(input, target, {ignore_index = -100, label_smoothing = 0, reduction = 'mean', out=})
-- input (N, C) or (N, C, d1, ...) logits, target int64 1-based class indices (N) or (N, d1, ...)
-- -> a 0-D tensor (mean, sum) or target's shape (none)
function F.cross_entropy(input, target, opts)
  return (impl.cross_entropy('fa.F.cross_entropy', input, target, opts))
end
function F.cross_entropy_backward(gradLoss, input, target, opts)
  return (impl.cross_entropy_backward('fa.F.cross_entropy_backward', gradLoss, input, target, opts))
end

package.loaded['fastattn.functional'] = F
return F
