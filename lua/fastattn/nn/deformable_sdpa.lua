-- deformable_sdpa.lua: nn.DeformableSDPA, multi-view deformable scaled-dot-product attention around the fused
-- op fa.deform_sdpa (DESIGN §4.5): every pixel of every view attends to `samples` points in every view, each
-- point placed by a learned offset from the pixel's own position, keys and values bilinearly sampled there.
--
--   m = nn.DeformableSDPA{dim = 256, heads = 8, views = 8, samples = 32}
--   y = m:forward(x)               x (B, V, H, W, dim), or (B, V, H*W, dim) with height and width given
--   gx = m:backward(x, gy)
--   y = m:forward{query, key_value}          queries from one tensor, keys and values from another of its size
--   gq, gkv = unpack(m:backward({query, key_value}, gy))      (also {query = q, key_value = kv})
--   pts = m:samplingPoints()       the last forward's coordinates (B, V, H*W, V, samples, 2), x first, in [0, 1]
-- Options: dim (required), views (required), heads = 8, samples = 4, dim_head = dim / heads, height, width
-- (needed for a (B, V, H*W, dim) input; a 5-d input names them itself and must agree), qkv_bias = false,
-- scale = dim_head^-1/2, offset_init = 0.5, deterministic = false (fa.deform_sdpa's option).
--
-- The data flow (x_q the query features, x_kv the key/value features, both (B, V, N = H*W, dim)):
--   q, k, v = to_q(x_q), to_k(x_kv), to_v(x_kv)     linears, as (B, V, heads, N, dim_head)
--   t = to_offsets(x_q)                            linear dim -> V * samples * 2, as (B, V, N, V, samples, 2)
--   coords = sigmoid(logit(ref) + t)               ref[n] = the pixel's own position (j/(W-1), i/(H-1)), x first
--   o = fa.deform_sdpa(q, k, v, coords, W, H, scale)
--   y = to_out(o as (B, V, N, heads * dim_head))   linear with bias
-- The coordinates are Deformable DETR's refined reference points (sigmoid(offset + inverse_sigmoid(reference))):
-- the offsets live in logit space, so any offset keeps every point inside the image ([0, 1] is the image in
-- fa.deform_sdpa's align_corners convention) and a zero offset is the pixel itself. The edge pixels' reference
-- points sit a quarter pixel inside (logit(0) is -inf); the sigmoid's slope there is about 1/(W-1) of the
-- centre's, so points move slower near the border. Query (v1, pixel n) reads view v2 at the same pixel
-- position plus its own offsets: every view is taken to show the scene in roughly the same place.
-- Initialisation: to_offsets' weight zero; its bias puts sample 1 of every view on the pixel and samples 2..S on
-- a square ring of directions (Deformable DETR's radial grid) at offset_init logits (0.5: a point about 1.8
-- pixels away at W = 16 near the centre), so the samples differ from the first step (equal ones would get
-- equal gradients and never part). Other linears: PyTorch's default.
-- Parameters, in state_dict order: to_q.weight, to_k.weight, to_v.weight (and their biases with qkv_bias),
-- to_offsets.{weight,bias}, to_out.{weight,bias}.
-- Backward: fa.deform_sdpa_backward gives q, k, v and the coordinates' gradient; d coords / d t =
-- coords (1 - coords), so the offsets learn through it. Every intermediate lives in a buffer kept by the module.
-- 16-bit dtypes (GPU): the coordinates are float32 (fa.deform_sdpa's contract).
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'
local E = require 'fastattn.errors'
local op = F._impl
local U = require 'fastattn.nn.layer_util'
local buffer = U.buffer

local DS = nn.class('DeformableSDPA', nn.Module)

local NEW = 'fa.nn.DeformableSDPA'
local OPTS = { dim = true, heads = true, views = true, samples = true, dim_head = true, height = true, width = true,
               qkv_bias = true, scale = true, offset_init = true, deterministic = true }
local DT = fa.dtypes

function DS:__init(opts)
  nn.Module.__init(self)
  opts = E.opts(NEW, 'opts', opts, OPTS)
  local dim = E.integer(NEW, 'dim', opts.dim, 1)
  local V = E.integer(NEW, 'views', opts.views, 1)
  local heads = E.integer(NEW, 'heads', opts.heads, 1, nil, true) or 8
  local S = E.integer(NEW, 'samples', opts.samples, 1, nil, true) or 4
  local D = E.integer(NEW, 'dim_head', opts.dim_head, 1, nil, true)
  if D == nil then
    if dim % heads ~= 0 then
      E.argv(NEW, 'dim', string.format('a multiple of heads = %d (or give dim_head)', heads), dim)
    end
    D = dim / heads
  end
  local H = E.integer(NEW, 'height', opts.height, 1, nil, true)
  local W = E.integer(NEW, 'width', opts.width, 1, nil, true)
  if (H == nil) ~= (W == nil) then
    E.fail(NEW, "arguments 'height', 'width': expected both or neither, got %s", H and 'height only' or 'width only')
  end
  local scale = E.number(NEW, 'scale', opts.scale, true) or 1 / math.sqrt(D)
  if scale ~= scale or scale == math.huge or scale == -math.huge then
    E.argv(NEW, 'scale', 'a finite number', scale)
  end
  local init = E.number(NEW, 'offset_init', opts.offset_init, true) or 0.5
  if init ~= init or init == math.huge or init == -math.huge then
    E.argv(NEW, 'offset_init', 'a finite number', init)
  end
  local qkv_bias = E.boolean(NEW, 'qkv_bias', opts.qkv_bias, true) or false
  self.deterministic = E.boolean(NEW, 'deterministic', opts.deterministic, true) or false
  self.dim, self.views, self.heads, self.samples, self.dim_head = dim, V, heads, S, D
  self.height, self.width, self.scale, self.offset_init, self.qkv_bias = H, W, scale, init, qkv_bias
  local inner, no = heads * D, V * S * 2
  local n = 3 * inner * (dim + (qkv_bias and 1 or 0)) + no * (dim + 1) + dim * (inner + 1)
  if n >= 2 ^ 53 or fa._beyond_host(n * fa.C.fa_dtype_size(fa.dtype_id(fa.getDefaultDtype()))) then
    E.fail(NEW, "arguments 'dim', 'heads', 'dim_head', 'views', 'samples': parameters of %s elements are too large " ..
           'to allocate', n < 2 ^ 53 and string.format('%d', n) or string.format('%.4g', n))
  end
  self:registerModule('to_q', nn.Linear(dim, inner, qkv_bias))
  self:registerModule('to_k', nn.Linear(dim, inner, qkv_bias))
  self:registerModule('to_v', nn.Linear(dim, inner, qkv_bias))
  self:registerModule('to_offsets', nn.Linear(dim, no))
  self:registerModule('to_out', nn.Linear(inner, dim))
  self:_resetOffsets()
end

-- sample 1 on the pixel, samples 2..S on a square ring (cos, sin) / max(|cos|, |sin|) * offset_init, the same
-- in every view
function DS:_resetOffsets()
  local V, S, init = self.views, self.samples, self.offset_init
  local b = {}
  for _ = 1, V do
    for s = 1, S do
      local x, y = 0, 0
      if s > 1 then
        local th = 2 * math.pi * (s - 2) / (S - 1)
        local c, sn = math.cos(th), math.sin(th)
        if math.abs(c) < 1e-12 then c = 0 end -- (cos(pi/2) is 6e-17, not 0)
        if math.abs(sn) < 1e-12 then sn = 0 end
        local m = math.max(math.abs(c), math.abs(sn))
        x, y = init * c / m, init * sn / m
      end
      b[#b + 1] = x
      b[#b + 1] = y
    end
  end
  local lin = self.to_offsets
  lin.weight:zero()
  lin.bias:copy(fa.tensor(b, 'float64'):to(lin.bias:dtype(), lin.bias:device()))
end

function DS:reset()
  for _, name in ipairs({ 'to_q', 'to_k', 'to_v', 'to_out' }) do self[name]:reset() end
  self:_resetOffsets()
  return self
end

function DS:__tostring__()
  local s = string.format('nn.DeformableSDPA(dim %d, heads %d x %d, views %d, samples %d', self.dim, self.heads,
                          self.dim_head, self.views, self.samples)
  if self.height then s = s .. string.format(', %dx%d', self.height, self.width) end
  return s .. ')'
end

---------------------------------------------------------------------------- helpers
-- logit(ref) (N, V*S*2) for an H x W image, cached per size, dtype and device: the pixel's position in [0, 1]
-- (x = j/(W-1), y = i/(H-1); 0.5 on a side of 1 pixel), a quarter pixel inside at the edges
local function logit_ref(self, H, W, dtype, device)
  local key = table.concat({ H, W, dtype, device, self.views, self.samples }, ',')
  local c = self._ref
  if c and c.key == key then return c.t end
  local function pos(j, n)
    if n == 1 then return 0.5 end
    local e = 0.25 / (n - 1)
    return math.min(math.max(j / (n - 1), e), 1 - e)
  end
  local function logit(p) return math.log(p / (1 - p)) end
  local n, flat = self.views * self.samples, {}
  for i = 0, H - 1 do
    for j = 0, W - 1 do
      local lx, ly = logit(pos(j, W)), logit(pos(i, H))
      for _ = 1, n do
        flat[#flat + 1] = lx
        flat[#flat + 1] = ly
      end
    end
  end
  local tt = fa.tensor(flat, 'float64'):view(H * W, 2 * n):to(dtype, device)
  self._ref = { key = key, t = tt }
  return tt
end

local function get(input, i, name)
  local v = input[i]
  if v == nil then v = input[name] end
  return v
end

-- checks the input; returns x_q, x_kv (contiguous), B, V, H, W, whether the input is a table
function DS:_unpack(fn, input)
  local w = self.to_q.weight
  local xq, xkv, tbl = input, input, false
  if type(input) == 'table' and not fa.isTensor(input) then
    xq, xkv, tbl = get(input, 1, 'query'), get(input, 2, 'key_value'), true
    nn._checkInput(fn, 'query', xq, w)
    nn._checkInput(fn, 'key_value', xkv, w)
  elseif fa.isTensor(input) then
    nn._checkInput(fn, 'input', input, w)
  else
    E.argv(fn, 'input', 'a tensor or a table {query, key_value}', input)
  end
  local name = tbl and 'query' or 'input'
  local V, dim, H, W = self.views, self.dim, self.height, self.width
  local d = xq:dim()
  local ok = (d == 4 or d == 5) and xq:size(2) == V and xq:size(d) == dim and xq:size(1) >= 1
  if ok and d == 5 then
    ok = (H == nil or (xq:size(3) == H and xq:size(4) == W))
    H, W = xq:size(3), xq:size(4)
  elseif ok then
    ok = H ~= nil and xq:size(3) == H * W
  end
  if not ok then
    local want
    if self.height then
      local h, w = self.height, self.width
      want = string.format('a tensor of size (B, %d, %d, %d, %d) or (B, %d, %d, %d) (views, height, width, dim)', V,
                           h, w, dim, V, h * w, dim)
    else
      want = string.format('a tensor of size (B, %d, H, W, %d) (views, height, width, dim; a (B, V, H*W, dim) ' ..
                           'input needs the height and width options)', V, dim)
    end
    E.arg(fn, name, want, xq)
  end
  if tbl and not xkv:isSameSizeAs(xq) then
    E.arg(fn, 'key_value', string.format("a tensor of size %s (as 'query')", fa._shape_str(xq, 'x')), xkv)
  end
  local B = xq:size(1)
  xq = nn._contiguous(self, '_xqC', xq)
  xkv = tbl and nn._contiguous(self, '_xkvC', xkv) or xq
  return xq, xkv, B, V, H, W, tbl
end

-- (B, V, N, heads*D) rows as a (B, V, heads, N, D) view (fa.deform_sdpa reads strided q, k, v, grad_out)
local function heads_view(t, B, V, N, heads, D) return t:view(B, V, N, heads, D):permute(1, 2, 4, 3, 5) end

---------------------------------------------------------------------------- forward
function DS:updateOutput(input)
  local fn = self.__fnForward
  local xq, xkv, B, V, H, W = self:_unpack(fn, input)
  local heads, D, S, dim = self.heads, self.dim_head, self.samples, self.dim
  local N, inner = H * W, heads * D
  local dt, dev, pdt = xq.desc.dtype, xq.desc.device, U.posDtype(xq)
  local rows = { B, V, N, dim }
  local xq4, xkv4 = xq:view(rows), xkv:view(rows)

  local q = heads_view(self.to_q:forward(xq4), B, V, N, heads, D)
  local k = heads_view(self.to_k:forward(xkv4), B, V, N, heads, D)
  local v = heads_view(self.to_v:forward(xkv4), B, V, N, heads, D)
  self._qa, self._ka, self._va = q, k, v

  -- coords = sigmoid(t + logit(ref)), (B, V, N, V, S, 2) in pdt
  local t = self.to_offsets:forward(xq4)
  local coords = buffer(self, '_coords', { B, V, N, V, S, 2 }, pdt, dev)
  local c2 = coords:view(B * V, N, V * S * 2)
  c2:copy(t:view(B * V, N, V * S * 2)):add_(logit_ref(self, H, W, pdt, xq:device()))
  op.unary(fn, F._unary_op.sigmoid, c2, { out = c2 })

  local oa = buffer(self, '_oa', { B, V, heads, N, D }, dt, dev)
  local lse = buffer(self, '_lse', { B, V, heads, N }, dt == DT.float64 and DT.float64 or DT.float32, dev)
  self._fopts = self._fopts or {}
  local fo = self._fopts
  fo.out, fo.lse, fo.deterministic = oa, lse, self.deterministic or nil
  fa.deform_sdpa(q, k, v, coords, W, H, self.scale, fo)
  fo.out, fo.lse = nil, nil

  local o = buffer(self, '_o', { B, V, N, inner }, dt, dev)
  o:view(B, V, N, heads, D):copy(oa:permute(1, 2, 4, 3, 5))
  local y = self.to_out:forward(o)
  self._size = { B, H, W }
  self.output = y:view(xq:size())
  return self.output
end

-- the coordinates of the last forward (a kept buffer: the next forward overwrites it)
function DS:samplingPoints()
  if self._coords == nil then E.fail('fa.nn.DeformableSDPA:samplingPoints', 'no forward yet (call forward first)') end
  return self._coords
end

---------------------------------------------------------------------------- backward
-- the input gradient(s); with acc, the children's fused backward calls also add their parameter gradients
function DS:_backward(fn, input, gradOutput, scale, acc)
  local xq, xkv, B, V, H, W, tbl = self:_unpack(fn, input)
  U.lastForward(self, fn, B, H, W)
  nn._checkGradOutput(fn, gradOutput, xq, xq:size())
  local heads, D, S, dim = self.heads, self.dim_head, self.samples, self.dim
  local N, inner = H * W, heads * D
  local dt, dev, pdt = xq.desc.dtype, xq.desc.device, U.posDtype(xq)
  local rows = { B, V, N, dim }
  local xq4, xkv4 = xq:view(rows), xkv:view(rows)
  local child = U.childBackward(acc, scale)

  local gy = nn._contiguous(self, '_gyC', gradOutput):view(rows)
  local gO = child(self.to_out, self._o, gy)
  local gOa = heads_view(gO, B, V, N, heads, D)
  self._bopts = self._bopts or {}
  local bo = self._bopts
  bo.deterministic = self.deterministic or nil
  bo.grad_q = buffer(self, '_gqa', { B, V, heads, N, D }, dt, dev)
  bo.grad_k = buffer(self, '_gka', { B, V, heads, N, D }, dt, dev)
  bo.grad_v = buffer(self, '_gva', { B, V, heads, N, D }, dt, dev)
  bo.grad_coords = buffer(self, '_gcoords', { B, V, N, V, S, 2 }, pdt, dev)
  fa.deform_sdpa_backward(gOa, self._qa, self._ka, self._va, self._coords, W, H, self.scale, self._oa, self._lse, bo)
  bo.grad_q, bo.grad_k, bo.grad_v, bo.grad_coords = nil, nil, nil, nil

  -- back to rows (B, V, N, inner)
  local function merge(key, g)
    local r = buffer(self, key, { B, V, N, inner }, dt, dev)
    r:view(B, V, N, heads, D):copy(g:permute(1, 2, 4, 3, 5))
    return r
  end
  self._gQ = merge('_gQ', self._gqa)
  self._gK = merge('_gK', self._gka)
  self._gV = merge('_gV', self._gva)

  -- the offsets: d coords / d t = coords (1 - coords) (the sigmoid's derivative from its output)
  local gT = buffer(self, '_gT', { B, V, N, V * S * 2 }, dt, dev)
  local c2 = self._coords:view(B, V, N, V * S * 2)
  if pdt ~= dt then
    local g32 = buffer(self, '_gT32', { B, V, N, V * S * 2 }, pdt, dev)
    op.unary_backward(fn, F._unary_op.sigmoid, self._gcoords:view(B, V, N, V * S * 2), nil,
                      { output = c2, grad_input = g32 })
    gT:copy(g32)
  else
    op.unary_backward(fn, F._unary_op.sigmoid, self._gcoords:view(B, V, N, V * S * 2), nil,
                      { output = c2, grad_input = gT })
  end

  local gxq = buffer(self, '_gxq', rows, dt, dev)
  gxq:copy(child(self.to_q, xq4, self._gQ)):add_(child(self.to_offsets, xq4, gT))
  local gxkv = tbl and buffer(self, '_gxkv', rows, dt, dev) or gxq
  if tbl then gxkv:copy(child(self.to_k, xkv4, self._gK)) else gxkv:add_(child(self.to_k, xkv4, self._gK)) end
  gxkv:add_(child(self.to_v, xkv4, self._gV))
  if tbl then
    self._gin = self._gin or {}
    self._gin[1], self._gin[2] = gxq:view(xq:size()), gxkv:view(xq:size())
    self.gradInput = self._gin
  else
    self.gradInput = gxq:view(xq:size())
  end
  self._gT = gT
  return self.gradInput
end

function DS:updateGradInput(input, gradOutput)
  return self:_backward(self.__fnUpdateGradInput, input, gradOutput, 1, false)
end

-- uses what updateGradInput left (the Torch7 order: updateGradInput, then accGradParameters)
function DS:accGradParameters(input, gradOutput, scale)
  local fn = self.__fnAccGradParameters
  local xq, xkv, B, V, H, W = self:_unpack(fn, input)
  scale = E.number(fn, 'scale', scale, true) or 1
  if self._gT == nil or self._gT:size(1) ~= B or self._gT:size(3) ~= H * W then
    E.fail(fn, 'call updateGradInput before accGradParameters')
  end
  local rows = { B, V, H * W, self.dim }
  local xq4, xkv4 = xq:view(rows), xkv:view(rows)
  self.to_out:accGradParameters(self._o, nn._contiguous(self, '_gyC', gradOutput):view(rows), scale)
  self.to_q:accGradParameters(xq4, self._gQ, scale)
  self.to_k:accGradParameters(xkv4, self._gK, scale)
  self.to_v:accGradParameters(xkv4, self._gV, scale)
  self.to_offsets:accGradParameters(xq4, self._gT, scale)
end

-- both in one pass (the children's fused backward calls)
function DS:backward(input, gradOutput, scale)
  return self:_backward(self.__fnBackward, input, gradOutput, E.number(self.__fnBackward, 'scale', scale, true) or 1,
                        true)
end

return DS
