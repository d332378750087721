-- msdeformattn.lua: nn.MSDeformAttn, Deformable DETR's multi-scale deformable attention layer
-- (models/ops/modules/ms_deform_attn.py of fundamentalvision/Deformable-DETR), on fa.msda.
--
--   m = nn.MSDeformAttn{d_model = 256, n_levels = 4, n_heads = 8, n_points = 4}
--   out = m:forward{query, reference_points, input_flatten, spatial_shapes, level_start_index,
--                   input_padding_mask}
--   gradQuery, gradReferencePoints, gradInputFlatten = unpack(m:backward(input, gradOutput))
--
-- query (N, Lq, C), reference_points (N, Lq, L, 2) as normalised (x, y) or (N, Lq, L, 4) as boxes
-- (cx, cy, w, h), input_flatten (N, S, C), spatial_shapes (L, 2) int64 (H, W) per level (a tensor on any
-- device or a Lua table {{H, W}, ...}), level_start_index (L) int64 (or nil: computed from the shapes),
-- input_padding_mask (N, S) bool (true = padding) or nil  ->  output (N, Lq, C).
-- The input may also be given with these names as keys ({query = q, reference_points = r, ...}).
--
-- The data flow is the reference's:
--   value = value_proj(input_flatten), zero where input_padding_mask is true, viewed (N, S, M, C/M)
--   offsets = sampling_offsets(query) (N, Lq, M, L, P, 2)
--   A = softmax over L*P of attention_weights(query) (N, Lq, M, L, P)
--   loc = ref + offsets / (W_l, H_l)                      (2-d reference points)
--   loc = ref_xy + offsets / P * ref_wh * 0.5             (4-d reference points)
--   output = output_proj(fa.msda(value, spatial_shapes, level_start_index, loc, A))
-- Parameters, named as the reference's state_dict: sampling_offsets.{weight,bias},
-- attention_weights.{weight,bias}, value_proj.{weight,bias}, output_proj.{weight,bias}; initialised as the
-- reference's _reset_parameters (the offset bias is a radial grid of n_heads directions, point i scaled by
-- i + 1; attention weights zero; xavier-uniform value/output projections with zero biases). backward
-- returns {gradQuery, gradReferencePoints, gradInputFlatten} (the shapes, start index and mask get no
-- gradient) and adds the parameter gradients. Every intermediate lives in a buffer kept by the module
-- and reused by the next call of the same size. The same code runs on the CPU and, after :cuda(), on
-- the GPU (every op dispatches on the tensors' device); spatial shapes are read on the host.
-- The module checks what is about the module (its sizes, the input table, the parameters' dtype and
-- device); fa.msda checks the levels against input_flatten and level_start_index.
local ffi = require 'ffi'
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local U = require 'fastattn.nn.layer_util'
local F = require 'fastattn.functional'
local E = require 'fastattn.errors'

local MSDeformAttn = nn.class('MSDeformAttn', nn.Module)

local NEW, FWD, BWD = 'fa.nn.MSDeformAttn', 'fa.nn.MSDeformAttn:forward', 'fa.nn.MSDeformAttn:backward'
local OPTS = { d_model = true, n_levels = true, n_heads = true, n_points = true, padding = true,
               align_corners = true, deterministic = true }

-- float32 rounding, so that the default initialisation is the reference's float32 arithmetic bit for bit
local f32 = ffi.new('float[1]')
local function round32(v) f32[0] = v; return tonumber(f32[0]) end

function MSDeformAttn:__init(opts)
  nn.Module.__init(self)
  opts = E.opts(NEW, 'opts', opts, OPTS)
  self.d_model = E.integer(NEW, 'd_model', opts.d_model, 1, nil, true) or 256
  self.n_levels = E.integer(NEW, 'n_levels', opts.n_levels, 1, nil, true) or 4
  self.n_heads = E.integer(NEW, 'n_heads', opts.n_heads, 1, nil, true) or 8
  self.n_points = E.integer(NEW, 'n_points', opts.n_points, 1, nil, true) or 4
  if self.d_model % self.n_heads ~= 0 then
    E.arg(NEW, 'd_model', 'a multiple of n_heads = ' .. self.n_heads, self.d_model)
  end
  self.d_head = self.d_model / self.n_heads
  -- fa.msda options (padding 'zeros' and align_corners false are the reference's)
  self.msda_opts = { padding = E.string(NEW, 'padding', opts.padding, { 'zeros', 'border' }, true) or 'zeros',
                     align_corners = E.boolean(NEW, 'align_corners', opts.align_corners, true) or false,
                     deterministic = E.boolean(NEW, 'deterministic', opts.deterministic, true) or false }
  local d, M, L, P = self.d_model, self.n_heads, self.n_levels, self.n_points
  -- the parameters' size, checked here so that a message names this constructor and its options
  local n = (d + 1) * (M * L * P * 3 + 2 * d)
  if n >= 2 ^ 53 or fa._beyond_host(n * fa.C.fa_dtype_size(fa.dtype_id(fa.getDefaultDtype()))) then
    E.fail(NEW, "arguments 'd_model', 'n_levels', 'n_heads', 'n_points': parameters of %s elements are too large to " ..
           'allocate', n < 2 ^ 53 and string.format('%d', n) or string.format('%.4g', n))
  end
  -- registration order = the reference's state_dict order
  self:registerModule('sampling_offsets', nn.Linear(d, M * L * P * 2))
  self:registerModule('attention_weights', nn.Linear(d, M * L * P))
  self:registerModule('value_proj', nn.Linear(d, d))
  self:registerModule('output_proj', nn.Linear(d, d))
  self:reset()
end

-- the reference's _reset_parameters
function MSDeformAttn:reset()
  local M, L, P = self.n_heads, self.n_levels, self.n_points
  self.sampling_offsets.weight:zero()
  -- thetas = arange(M) * (2 pi / M) in float32; grid = (cos, sin) / max(|cos|, |sin|); point i times i + 1
  local bias = {}
  local step = round32(2.0 * math.pi / M)
  for m = 0, M - 1 do
    local theta = round32(m * step)
    local c, s = round32(math.cos(theta)), round32(math.sin(theta))
    local mx = math.max(math.abs(c), math.abs(s))
    c, s = round32(c / mx), round32(s / mx)
    for _ = 1, L do
      for p = 1, P do
        bias[#bias + 1] = round32(c * p)
        bias[#bias + 1] = round32(s * p)
      end
    end
  end
  local b = self.sampling_offsets.bias
  b:copy(fa.tensor(bias, { dtype = 'float64' }):to(b:dtype(), b:device()))
  self.attention_weights.weight:zero()
  self.attention_weights.bias:zero()
  for _, name in ipairs({ 'value_proj', 'output_proj' }) do
    local lin = self[name]
    local bound = math.sqrt(6 / (lin.inputSize + lin.outputSize)) -- xavier_uniform_, gain 1
    lin.weight:uniform(-bound, bound)
    lin.bias:zero()
  end
  return self
end

function MSDeformAttn:__tostring__()
  return string.format('nn.MSDeformAttn(d_model %d, n_levels %d, n_heads %d, n_points %d)', self.d_model,
                       self.n_levels, self.n_heads, self.n_points)
end

---------------------------------------------------------------------------- helpers
local function buffer(self, key, shape, like)
  self[key] = nn._buffer(self[key], shape, like)
  return self[key]
end

-- out = a @ w^T, into a kept buffer
local function linear_into(out, a, w) return F.linear(a, w, nil, { out = out }) end
-- out = a * b elementwise (one shape), into a kept buffer
local function mul_into(out, a, b) return out:copy(a):mul_(b) end

local function get(input, i, name)
  local v = input[i]
  if v == nil then v = input[name] end
  return v
end

-- the levels {{H, W}, ...} read on the host; fa.msda checks them against input_flatten and the start index
local function levels_of(fn, shapes, L)
  local hw = shapes
  if fa.isTensor(shapes) then
    if shapes:dim() ~= 2 or shapes:size(2) ~= 2 then E.argv(fn, 'spatial_shapes', 'an (L, 2) tensor', shapes) end
    if shapes:isFloatingPoint() then E.argv(fn, 'spatial_shapes', 'an int64 or int32 (L, 2) tensor', shapes) end
    hw = shapes:to('float64', 'cpu'):table()
  elseif type(shapes) ~= 'table' then
    E.argv(fn, 'spatial_shapes', '{{H, W}, ...} or an (L, 2) tensor', shapes)
  end
  if #hw ~= L then E.arg(fn, 'spatial_shapes', L .. ' levels (n_levels)', #hw .. ' levels') end
  local S = 0
  for l = 1, L do
    local e = hw[l]
    if type(e) ~= 'table' or fa.isTensor(e) or #e ~= 2 then
      E.arg(fn, 'spatial_shapes[' .. l .. ']', '{H, W}', E.describe(e))
    end
    local name = 'spatial_shapes[' .. l .. ']'
    S = S + E.integer(fn, name, e[1], 0, 2 ^ 31 - 1) * E.integer(fn, name, e[2], 0, 2 ^ 31 - 1)
  end
  return hw, S
end

-- checks the input table against the module; returns query, ref, x, levels {{H, W}...}, shapes, lsi, mask,
-- N, Lq, S, nref
function MSDeformAttn:_unpack(fn, input)
  if type(input) ~= 'table' or fa.isTensor(input) then
    E.argv(fn, 'input', 'a table {query, reference_points, input_flatten, spatial_shapes, level_start_index, '
          .. 'input_padding_mask}', input)
  end
  local q, ref, x = get(input, 1, 'query'), get(input, 2, 'reference_points'), get(input, 3, 'input_flatten')
  local w = self.value_proj.weight
  for _, a in ipairs({ { 'query', q }, { 'reference_points', ref }, { 'input_flatten', x } }) do
    local t = E.tensor(fn, a[1], a[2])
    if t:dtype() ~= w:dtype() or t:device() ~= w:device() then
      E.argv(fn, a[1], string.format("a %s tensor on %s (the module's parameters; convert with :type()/:cuda())",
            w:dtype(), w:device()), t)
    end
  end
  local d, L = self.d_model, self.n_levels
  if q:dim() ~= 3 or q:size(3) ~= d then E.argv(fn, 'query', string.format('size (N, Lq, %d)', d), q) end
  local N, Lq = q:size(1), q:size(2)
  if x:dim() ~= 3 or x:size(1) ~= N or x:size(3) ~= d then
    E.argv(fn, 'input_flatten', string.format("size (N, S, %d) with N = %d (as 'query')", d, N), x)
  end
  local hw, total = levels_of(fn, get(input, 4, 'spatial_shapes'), L)
  if x:size(2) ~= total then
    E.argv(fn, 'input_flatten', string.format('size (N, S, %d) with S = %d (the sum of H*W over spatial_shapes)', d,
           total), x)
  end
  local S, nref = x:size(2), ref:dim() == 4 and ref:size(4)
  if (nref ~= 2 and nref ~= 4) or ref:size(1) ~= N or ref:size(2) ~= Lq or ref:size(3) ~= L then
    E.argv(fn, 'reference_points', string.format('size %dx%dx%dx2 or %dx%dx%dx4 (N, Lq, n_levels, points 2 or boxes 4)',
          N, Lq, L, N, Lq, L), ref)
  end
  local mask = get(input, 6, 'input_padding_mask')
  if mask ~= nil and not (fa.isTensor(mask) and mask:dtype() == 'bool' and mask:dim() == 2 and mask:size(1) == N
                          and mask:size(2) == S) then
    E.argv(fn, 'input_padding_mask', string.format('a bool tensor of size %dx%d (N, S) or nil', N, S), mask)
  end
  local shapes = get(input, 4, 'spatial_shapes')
  return q, ref, x, hw, shapes, get(input, 5, 'level_start_index'), mask, N, Lq, S, nref
end

-- selection matrices (cached per reference-point kind, dtype and device) that broadcast reference points
-- (rows of L*nref values) to the sampling-location layout (M*L*P*2 columns) by a GEMM:
--   xy (L*nref, M*L*P*2): 1 where column (m, l, p, c) takes ref[l, c] (c = x, y)
--   wh (L*4, M*L*P*2): 0.5/P where column (m, l, p, c) takes ref[l, 2 + c] (boxes only)
-- and their transposes xyT, whT (as linear weights: out = ref @ xy = linear(ref, xyT))
function MSDeformAttn:_selection(nref, like)
  local key = nref .. like:dtype() .. like:device()
  self._sel = self._sel or {}
  local s = self._sel[key]
  if s and s.xy:dtype() == like:dtype() and s.xy:device() == like:device() then return s end -- (also after :type())
  local M, L, P = self.n_heads, self.n_levels, self.n_points
  local cols = M * L * P * 2
  local xy, wh = {}, {}
  for r = 1, L * nref do
    xy[r], wh[r] = {}, {}
    for c = 1, cols do xy[r][c], wh[r][c] = 0, 0 end
  end
  for m = 0, M - 1 do
    for l = 0, L - 1 do
      for p = 0, P - 1 do
        for c = 0, 1 do
          local col = ((m * L + l) * P + p) * 2 + c + 1
          xy[l * nref + c + 1][col] = 1
          if nref == 4 then wh[l * nref + 2 + c + 1][col] = 0.5 / P end
        end
      end
    end
  end
  local function put(t) return fa.tensor(t, 'float64'):to(like:dtype(), like:device()) end
  s = { xy = put(xy) }
  s.xyT = s.xy:transpose(1, 2):contiguous()
  if nref == 4 then
    s.wh = put(wh)
    s.whT = s.wh:transpose(1, 2):contiguous()
  end
  self._sel[key] = s
  return s
end

-- (rows, M*L*P*2): (1/W_l, 1/H_l) at every column (m, l, p, c) of every row (the 2-d offset normaliser),
-- cached for the levels, row count, dtype and device
function MSDeformAttn:_invNormRows(rows, hw, like)
  local M, L, P = self.n_heads, self.n_levels, self.n_points
  local row, key = {}, { rows }
  for l = 1, L do key[l + 1] = hw[l][1] .. 'x' .. hw[l][2] end
  key = table.concat(key, ',')
  local z = self._invNorm
  if z == nil or self._invNormKey ~= key or z:dtype() ~= like:dtype() or z:device() ~= like:device() then
    for _ = 1, M do
      for l = 1, L do
        for _ = 1, P do
          row[#row + 1] = 1 / hw[l][2]
          row[#row + 1] = 1 / hw[l][1]
        end
      end
    end
    z = fa.tensor(row, 'float64'):to(like:dtype(), like:device()):view(1, #row):expand(rows, #row):contiguous()
    self._invNorm, self._invNormKey = z, key
  end
  return z
end

function MSDeformAttn:_msdaOpts(o)
  o.padding, o.align_corners, o.deterministic = self.msda_opts.padding, self.msda_opts.align_corners,
                                                  self.msda_opts.deterministic
  return o
end

---------------------------------------------------------------------------- forward
function MSDeformAttn:updateOutput(input)
  local q, ref, x, hw, shapes, lsi, mask, N, Lq, S, nref = self:_unpack(FWD, input)
  local M, L, P, D, d = self.n_heads, self.n_levels, self.n_points, self.d_head, self.d_model

  -- value = value_proj(x), zeroed at padding (masked_fill(mask, 0)): multiplied by keep = 1 - mask
  local value = self.value_proj:forward(x)
  if mask ~= nil then
    if mask:device() ~= q:device() then mask = mask:to(nil, q:device()) end
    local keep = buffer(self, '_keep', { N, S, d }, q)
    keep:copy(mask:unsqueeze(3):expand(N, S, d)):scale_(-1, 1)
    value:mul_(keep)
  end
  self._masked = mask ~= nil
  self._nref = nref
  self._value = value:view(N, S, M, D)

  -- offsets (N, Lq, M, L, P, 2) and A = softmax over L*P (N, Lq, M, L, P)
  local off = self.sampling_offsets:forward(q):view(N * Lq, M * L * P * 2)
  local logits = self.attention_weights:forward(q):view(N, Lq, M, L * P)
  local A = buffer(self, '_attn', { N, Lq, M, L, P }, q)
  F.softmax(logits, 4, { out = A:view(N, Lq, M, L * P) })

  -- sampling locations, as (N*Lq, M*L*P*2) rows: loc = ref_xy + off * scale, where ref_xy and scale are
  -- ref broadcast over heads and points (a GEMM with a 0/1 selection matrix does the broadcast, so every
  -- elementwise op below runs on contiguous tensors of one shape)
  local rows, cols = N * Lq, M * L * P * 2
  local refC = nn._contiguous(self, '_refC', ref):view(rows, L * nref)
  local sel = self:_selection(nref, q)
  local rxy = linear_into(buffer(self, '_refXY', { rows, cols }, q), refC, sel.xyT)
  local scale = nref == 2 and self:_invNormRows(rows, hw, q) -- (1/W_l, 1/H_l) on every row
                or linear_into(buffer(self, '_whScale', { rows, cols }, q), refC, sel.whT) -- ref_wh * 0.5 / P
  self._scale = scale
  local loc = buffer(self, '_loc', { N, Lq, M, L, P, 2 }, q)
  rxy:addcmul(off, scale, 1, { out = loc:view(rows, cols) })

  -- core, then output_proj
  local core = buffer(self, '_core', { N, Lq, M * D }, q)
  fa.msda(self._value, shapes, lsi, loc, A, self:_msdaOpts({ out = core }))
  self.output = self.output_proj:forward(core)
  return self.output
end

---------------------------------------------------------------------------- backward
-- the input gradients; with acc, the children's fused backward also adds their parameter gradients
function MSDeformAttn:_backward(BWD, input, gradOutput, scale, acc)
  local q, _, x, _, shapes, lsi, _, N, Lq, S, nref = self:_unpack(BWD, input)
  local M, L, P, d = self.n_heads, self.n_levels, self.n_points, self.d_model
  E.tensor(BWD, 'gradOutput', gradOutput)
  if gradOutput:dim() ~= 3 or gradOutput:size(1) ~= N or gradOutput:size(2) ~= Lq or gradOutput:size(3) ~= d then
    E.argv(BWD, 'gradOutput', string.format('size %dx%dx%d (N, Lq, d_model)', N, Lq, d), gradOutput)
  end
  local loc = self._loc
  if loc == nil or loc:size(1) ~= N or loc:size(2) ~= Lq or self._value:size(2) ~= S or self._nref ~= nref then
    E.fail(BWD, 'expected the input of the last forward (call forward first)')
  end
  local child = U.childBackward(acc, scale)

  local gCore = child(self.output_proj, self._core, gradOutput)
  local gV = buffer(self, '_gValue', { N, S, M, self.d_head }, q)
  local gLoc = buffer(self, '_gLoc', { N, Lq, M, L, P, 2 }, q)
  local gA = buffer(self, '_gAttn', { N, Lq, M, L, P }, q)
  fa.msda_backward(gCore, self._value, shapes, lsi, loc, self._attn, self:_msdaOpts({ grad_value = gV,
                   grad_sampling_locations = gLoc, grad_attention_weights = gA }))

  -- softmax backward -> logits gradient
  local gLogits = buffer(self, '_gLogits', { N, Lq, M * L * P }, q)
  F.softmax_backward(gA:view(N, Lq, M, L * P), self._attn:view(N, Lq, M, L * P), 4,
                     { grad_input = gLogits:view(N, Lq, M, L * P) })

  -- offsets: d loc / d off = scale; reference points: the sums over heads and points (GEMMs with the
  -- selection matrices), plus, for boxes, d loc / d ref_wh = off * 0.5 / P
  local rows, cols = N * Lq, M * L * P * 2
  local sel = self:_selection(nref, q)
  local gLoc2 = gLoc:view(rows, cols)
  local gOff = mul_into(buffer(self, '_gOff', { rows, cols }, q), gLoc2, self._scale)
  local gRef = buffer(self, '_gRef', { N, Lq, L, nref }, q)
  linear_into(gRef:view(rows, L * nref), gLoc2, sel.xy)
  if nref == 4 then
    local t = mul_into(buffer(self, '_gTmp', { rows, cols }, q), gLoc2, self.sampling_offsets.output:view(rows, cols))
    gRef:add_(linear_into(buffer(self, '_gRefWH', { N, Lq, L, nref }, q):view(rows, L * nref), t, sel.wh)
              :view(N, Lq, L, nref))
  end

  -- query: through both projections of the query
  local gq1 = child(self.sampling_offsets, q, gOff:view(N, Lq, cols))
  local gq2 = child(self.attention_weights, q, gLogits)
  local gQuery = buffer(self, '_gQuery', { N, Lq, d }, q):copy(gq1):add_(gq2)

  -- input_flatten: through the mask and value_proj
  local gVal = gV:view(N, S, d)
  if self._masked then gVal = mul_into(buffer(self, '_gValMasked', { N, S, d }, q), gVal, self._keep) end
  self._gValProj = gVal
  local gX = child(self.value_proj, x, gVal)

  self.gradInput = { gQuery, gRef, gX }
  return self.gradInput
end

function MSDeformAttn:updateGradInput(input, gradOutput)
  return self:_backward(self.__fnUpdateGradInput, input, gradOutput, 1, false)
end

-- uses the gradients that updateGradInput left (the Torch7 order: updateGradInput, then accGradParameters)
function MSDeformAttn:accGradParameters(input, gradOutput, scale)
  local fn = self.__fnAccGradParameters
  local q, _, x = self:_unpack(fn, input)
  if self._gValProj == nil then E.fail(fn, 'call updateGradInput before accGradParameters') end
  local N, Lq = q:size(1), q:size(2)
  self.output_proj:accGradParameters(self._core, gradOutput, scale)
  self.sampling_offsets:accGradParameters(q, self._gOff:view(N, Lq, -1), scale)
  self.attention_weights:accGradParameters(q, self._gLogits, scale)
  self.value_proj:accGradParameters(x, self._gValProj, scale)
end

-- both in one pass (the children's fused backward calls)
function MSDeformAttn:backward(input, gradOutput, scale)
  return self:_backward(BWD, input, gradOutput, scale or 1, true)
end

return MSDeformAttn
