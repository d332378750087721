-- deformable_attention2d.lua: nn.DeformableAttention2D, the DAT-style deformable attention of lucidrains'
-- DeformableAttention2D (deformable-attention 0.0.20) and, with num_groups < heads, of its grouped-query
-- variant (AbelHutten/deformable-grouped-query-attention, deformable_gqa), on fa.cpb and fa.attention.
--
--   m = nn.DeformableAttention2D{dim = 512, dim_head = 64, heads = 8, num_groups = 2}
--   y = m:forward(x)                    x (B, dim, H, W) -> y (B, dim, H, W)
--   gx = m:backward(x, gy)
-- Options (the reference's defaults): dim (required), dim_head = 64, heads = 8, num_groups = heads (key/value
-- heads), dropout = 0 (on the attention weights, training mode only), downsample_factor = 4 (r),
-- offset_scale = r, offset_groups = heads (G), offset_kernel_size = 6, group_queries = true,
-- group_key_values = true, normalize = 'reference' | 'corrected', return_vgrid = false (then the output is
-- {y, vgrid} with the unnormalised sampling grid vgrid (B*G, 2, Hk, Wk), and backward takes {gy, gvgrid or nil}).
--
-- The data flow is the reference's (shared/reference/deform2d.md §1-2), P = B*G, batch-major (p = b*G + g):
--   q = to_q(x)                          grouped 1x1 conv (B, heads*dim_head, H, W)
--   t = to_offsets(q as (P, heads*dim_head/G, H, W))   depthwise conv k/r -> GELU -> 1x1 conv to 2 -> tanh
--   vgrid = grid + offset_scale * t      (P, 2, Hk, Wk), grid[0] = column, grid[1] = row
--   kpos = normalize(vgrid)              (P, Hk, Wk, 2): x' = 2 x/(Hk - 1) - 1, y' = 2 y/(Wk - 1) - 1 (the
--                                        reference's swapped sides; 'corrected': x by Wk - 1, y by Hk - 1)
--   kv = grid_sample(x as (P, dim/G, H, W), kpos, zeros, align_corners = false)   as (B, dim, Hk, Wk)
--   k, v = to_k(kv), to_v(kv)            grouped 1x1 convs (B, dim_head*num_groups, Hk, Wk)
--   bias = fa.cpb(qpos, kpos, rel_pos_bias weights)   (B, heads, H*W, Hk*Wk), qpos the normalised pixel grid
--   o = fa.attention(q, k, v, bias, scale dim_head^-1/2)   query head h reads kv head h // (heads/num_groups)
--   y = to_out(o)                        1x1 conv with bias
-- offset_scale * t is folded into the normalisation (one scale and shift of t), so to_offsets holds the four
-- modules with state (its entries 0 and 2 carry the parameters, as in the reference's Sequential).
-- Parameters, named as the reference's state_dict: to_offsets.0.{weight,bias}, to_offsets.2.weight,
-- rel_pos_bias.mlp.0.0.{weight,bias}, rel_pos_bias.mlp.1.0.{weight,bias}, rel_pos_bias.mlp.2.{weight,bias},
-- to_q.weight, to_k.weight, to_v.weight, to_out.{weight,bias}; PyTorch's default initialisation.
-- The backward reaches the offset network through both paths of the key positions: grid_sample's grid
-- gradient and the CPB's key-position gradient. The one layout change per tensor is between the convs'
-- channel-major (B, heads*dim_head, N) and the attention's (B, heads, N, dim_head): q, k, v and o forward,
-- their gradients backward. Every intermediate lives in a buffer kept by the module.
-- 16-bit dtypes (GPU): the positions and the bias are float32 (fa.cpb's and fa.attention's contract); the
-- grid handed to grid_sample is a copy in the module's dtype.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'
local E = require 'fastattn.errors'
local op = F._impl
local U = require 'fastattn.nn.layer_util'
local buffer = U.buffer
local DT = fa.dtypes

local DA = nn.class('DeformableAttention2D', nn.Module)

local NEW = 'fa.nn.DeformableAttention2D'
local OPTS = { dim = true, dim_head = true, heads = true, num_groups = true, dropout = true, downsample_factor = true,
               offset_scale = true, offset_groups = true, offset_kernel_size = true, group_queries = true,
               group_key_values = true, normalize = true, return_vgrid = true }

function DA:__init(opts)
  nn.Module.__init(self)
  opts = E.opts(NEW, 'opts', opts, OPTS)
  local dim = E.integer(NEW, 'dim', opts.dim, 4)
  local D = E.integer(NEW, 'dim_head', opts.dim_head, 1, nil, true) or 64
  local heads = E.integer(NEW, 'heads', opts.heads, 1, nil, true) or 8
  local Hkv = E.integer(NEW, 'num_groups', opts.num_groups, 1, nil, true) or heads
  local r = E.integer(NEW, 'downsample_factor', opts.downsample_factor, 1, nil, true) or 4
  local s = E.number(NEW, 'offset_scale', opts.offset_scale, true) or r
  if s == math.huge or s == -math.huge then E.argv(NEW, 'offset_scale', 'a finite number', s) end
  local G = E.integer(NEW, 'offset_groups', opts.offset_groups, 1, nil, true) or heads
  local k = E.integer(NEW, 'offset_kernel_size', opts.offset_kernel_size, 1, nil, true) or 6
  local gq = E.boolean(NEW, 'group_queries', opts.group_queries, true) ~= false
  local gkv = E.boolean(NEW, 'group_key_values', opts.group_key_values, true) ~= false
  local p = E.number(NEW, 'dropout', opts.dropout, true) or 0
  if not (p >= 0 and p < 1) then E.argv(NEW, 'dropout', 'a probability in [0, 1)', p) end
  self.normalize = E.string(NEW, 'normalize', opts.normalize, { 'reference', 'corrected' }, true) or 'reference'
  self.return_vgrid = E.boolean(NEW, 'return_vgrid', opts.return_vgrid, true) or false
  -- the reference's assertions, then what its rearranges and grouped convs need
  if k < r then
    E.argv(NEW, 'offset_kernel_size', string.format('an integer >= downsample_factor = %d', r), k)
  end
  if (k - r) % 2 ~= 0 then
    E.argv(NEW, 'offset_kernel_size', string.format('downsample_factor = %d plus an even number', r), k)
  end
  if heads % G ~= 0 then E.argv(NEW, 'offset_groups', string.format('a divisor of heads = %d', heads), G) end
  if dim % G ~= 0 then E.argv(NEW, 'dim', string.format('a multiple of offset_groups = %d', G), dim) end
  if heads % Hkv ~= 0 then E.argv(NEW, 'num_groups', string.format('a divisor of heads = %d', heads), Hkv) end
  if gkv and (D * Hkv) % G ~= 0 then
    E.argv(NEW, 'num_groups', string.format('a value with dim_head * num_groups a multiple of offset_groups = %d ' ..
           '(group_key_values; dim_head = %d)', G, D), Hkv)
  end
  self.dim, self.dim_head, self.heads, self.num_groups, self.dropout = dim, D, heads, Hkv, p
  self.downsample_factor, self.offset_scale, self.offset_groups, self.offset_kernel_size = r, s, G, k
  self.group_queries, self.group_key_values = gq, gkv
  local inner, innerkv, od, C = D * heads, D * Hkv, D * heads / G, math.floor(dim / 4)
  local n = od * (k * k + 3) + C * (C + 5) + (heads / G) * (C + 1) + inner * dim * 2 + 2 * innerkv * dim + dim
  if n >= 2 ^ 53 or fa._beyond_host(n * fa.C.fa_dtype_size(fa.dtype_id(fa.getDefaultDtype()))) then
    E.fail(NEW, "arguments 'dim', 'dim_head', 'heads': parameters of %s elements are too large to allocate",
           n < 2 ^ 53 and string.format('%d', n) or string.format('%.4g', n))
  end
  -- registration order = the reference's state_dict order
  self:registerModule('to_offsets', nn.Sequential(
    nn.Conv2d{ od, od, k, groups = od, stride = r, padding = (k - r) / 2 }, nn.GELU(),
    nn.Conv2d{ od, 2, 1, bias = false }, nn.Tanh()))
  local cpb = nn.Module()
  cpb:registerModule('mlp', nn.ModuleList({ nn.Sequential(nn.Linear(2, C), nn.ReLU()),
                                            nn.Sequential(nn.Linear(C, C), nn.ReLU()),
                                            nn.Linear(C, heads / G) }))
  self:registerModule('rel_pos_bias', cpb)
  self:registerModule('to_q', nn.Conv2d{ dim, inner, 1, groups = gq and G or 1, bias = false })
  self:registerModule('to_k', nn.Conv2d{ dim, innerkv, 1, groups = gkv and G or 1, bias = false })
  self:registerModule('to_v', nn.Conv2d{ dim, innerkv, 1, groups = gkv and G or 1, bias = false })
  self:registerModule('to_out', nn.Conv2d{ inner, dim, 1 })
  self._pad, self._ac = F._grid_sample_opts(NEW, { padding_mode = 'zeros', align_corners = false })
end

function DA:reset()
  for _, c in ipairs(self:namedChildren()) do
    for _, e in ipairs(c[2]:_paramList()) do e.owner:reset() end
  end
  return self
end

function DA:__tostring__()
  local s = string.format('nn.DeformableAttention2D(dim %d, heads %d x %d, kv heads %d, offset groups %d, ' ..
                          'downsample %d, offset kernel %d, offset scale %g', self.dim, self.heads, self.dim_head,
                          self.num_groups, self.offset_groups, self.downsample_factor, self.offset_kernel_size,
                          self.offset_scale)
  if self.dropout > 0 then s = s .. ', dropout ' .. self.dropout end
  if self.normalize ~= 'reference' then s = s .. ', corrected normalisation' end
  return s .. ')'
end

---------------------------------------------------------------------------- helpers
-- the CPB's three linears (weight, bias each)
function DA:_mlp()
  local m = self.rel_pos_bias.mlp.modules
  return m[1].modules[1], m[2].modules[1], m[3]
end

-- the normalisation's divisors of x and y for an h x w grid: the reference divides x by h - 1 and y by w - 1
function DA:_div(h, w)
  local ax, ay = math.max(h - 1, 1), math.max(w - 1, 1)
  if self.normalize == 'corrected' then ax, ay = ay, ax end
  return ax, ay
end

-- constants, cached per sizes, dtype and device:
--   qpos (N, 2)        the normalised query grid, row-major, x first
--   base (Hk, Wk, 2)   the normalised reference grid; coef (2): d kpos / d t = 2 offset_scale / (ax, ay)
--   coef3 (2, 1, 1)    coef in the module's dtype (xdtype), for the channels-first gradient of t
--   grid (2, Hk, Wk)   the unnormalised reference grid in xdtype (for return_vgrid)
function DA:_constants(H, W, Hk, Wk, dtype, xdtype, device)
  local key = table.concat({ H, W, Hk, Wk, dtype, xdtype, device, self.normalize, self.offset_scale }, ',')
  local c = self._const
  if c and c.key == key then return c end
  local function put(t, shape, dt) return fa.tensor(t, 'float64'):view(shape):to(dt or dtype, device) end
  local qx, qy = self:_div(H, W)
  local q = {}
  for i = 0, H - 1 do
    for j = 0, W - 1 do q[#q + 1] = 2 * j / qx - 1; q[#q + 1] = 2 * i / qy - 1 end
  end
  local ax, ay = self:_div(Hk, Wk)
  local base, grid = {}, {}
  for i = 0, Hk - 1 do
    for j = 0, Wk - 1 do base[#base + 1] = 2 * j / ax - 1; base[#base + 1] = 2 * i / ay - 1 end
  end
  for ch = 0, 1 do
    for i = 0, Hk - 1 do
      for j = 0, Wk - 1 do grid[#grid + 1] = ch == 0 and j or i end
    end
  end
  local s = self.offset_scale
  c = { key = key, qpos = put(q, { H * W, 2 }), base = put(base, { Hk, Wk, 2 }),
        coef = put({ 2 * s / ax, 2 * s / ay }, { 2 }), coef3 = put({ 2 * s / ax, 2 * s / ay }, { 2, 1, 1 }, xdtype),
        grid = put(grid, { 2, Hk, Wk }, xdtype) }
  self._const = c
  return c
end

-- checks the input; returns x (contiguous), B, H, W
function DA:_check(fn, x)
  local w = self.to_q.weight
  nn._checkInput(fn, 'input', x, w)
  local r = self.downsample_factor
  if x:dim() ~= 4 or x:size(2) ~= self.dim or x:size(3) < r or x:size(4) < r then
    E.arg(fn, 'input', string.format('a tensor of size (B, %d, H, W) with H, W >= downsample_factor = %d', self.dim,
          r), x)
  end
  return nn._contiguous(self, '_xC', x), x:size(1), x:size(3), x:size(4)
end

---------------------------------------------------------------------------- forward
function DA:updateOutput(input)
  local fn = self.__fnForward
  local x, B, H, W = self:_check(fn, input)
  local G, heads, Hkv, D, dim = self.offset_groups, self.heads, self.num_groups, self.dim_head, self.dim
  local P, N, inner = B * G, H * W, heads * D
  local dt, dev, pdt = x.desc.dtype, x.desc.device, U.posDtype(x)

  -- queries and the offset network (on the queries grouped as (P, inner/G, H, W): a view)
  local q = self.to_q:forward(x)
  local t = self.to_offsets:forward(q:view(P, inner / G, H, W))
  local Hk, Wk = t:size(3), t:size(4)
  local M = Hk * Wk
  local c = self:_constants(H, W, Hk, Wk, pdt, dt, x:device())

  -- key positions (P, Hk, Wk, 2) = t (channels last) * coef + base
  local kpos = buffer(self, '_kpos', { P, Hk, Wk, 2 }, pdt, dev)
  kpos:copy(t:permute(1, 3, 4, 2)):mul_(c.coef):add_(c.base)
  local grid = kpos
  if pdt ~= dt then grid = buffer(self, '_kposLow', { P, Hk, Wk, 2 }, dt, dev):copy(kpos) end
  self._grid = grid

  -- keys and values from the input sampled at the key positions (x grouped as (P, dim/G, H, W): a view)
  local kv = buffer(self, '_kv', { B, dim, Hk, Wk }, dt, dev)
  op.grid_sample(fn, x:view(P, dim / G, H, W), grid, { out = kv:view(P, dim / G, Hk, Wk) }, self._pad, self._ac)
  local k, v = self.to_k:forward(kv), self.to_v:forward(kv)

  -- the attention layout (B, heads, N, D)
  local qa = buffer(self, '_qa', { B, heads, N, D }, dt, dev):copy(q:view(B, heads, D, N):transpose(3, 4))
  local ka = buffer(self, '_ka', { B, Hkv, M, D }, dt, dev):copy(k:view(B, Hkv, D, M):transpose(3, 4))
  local va = buffer(self, '_va', { B, Hkv, M, D }, dt, dev):copy(v:view(B, Hkv, D, M):transpose(3, 4))

  -- the position bias (P, heads/G, N, M) = (B, heads, N, M)
  local w1, w2, w3 = self:_mlp()
  local bias = buffer(self, '_bias', { P, heads / G, N, M }, pdt, dev)
  fa.cpb(c.qpos, kpos:view(P, M, 2), w1.weight, w1.bias, w2.weight, w2.bias, w3.weight, w3.bias, { out = bias })

  local oa = buffer(self, '_oa', { B, heads, N, D }, dt, dev)
  local lse = buffer(self, '_lse', { B, heads, N }, dt == DT.float64 and DT.float64 or DT.float32, dev)
  self._aopts = self._aopts or {}
  local ao = self._aopts
  ao.bias, ao.scale, ao.out, ao.lse = bias:view(B, heads, N, M), 1 / math.sqrt(D), oa, lse
  ao.dropout = (self.train and self.dropout > 0) and self.dropout or nil
  local _, _, rng = fa.attention(qa, ka, va, ao)
  ao.out, ao.lse = nil, nil
  self._rng = rng

  local o = buffer(self, '_o', { B, inner, H, W }, dt, dev)
  o:view(B, heads, D, N):copy(oa:transpose(3, 4))
  local y = self.to_out:forward(o)
  self._size = { B, H, W, Hk, Wk }
  if not self.return_vgrid then
    self.output = y
    return y
  end
  -- the unnormalised sampling grid, as the reference returns it: grid + offset_scale * t
  local vgrid = buffer(self, '_vgrid', { P, 2, Hk, Wk }, dt, dev)
  vgrid:copy(t):mul_(self.offset_scale):add_(c.grid)
  self.output = { y, vgrid }
  return self.output
end

---------------------------------------------------------------------------- backward
-- the input gradient; with acc, the children's fused backward calls also add their parameter gradients
function DA:_backward(fn, input, gradOutput, scale, acc)
  local x, B, H, W = self:_check(fn, input)
  local sz = U.lastForward(self, fn, B, H, W)
  local Hk, Wk = sz[4], sz[5]
  local G, heads, Hkv, D, dim = self.offset_groups, self.heads, self.num_groups, self.dim_head, self.dim
  local P, N, M, inner, innerkv = B * G, H * W, Hk * Wk, heads * D, Hkv * D
  local dt, dev, pdt = x.desc.dtype, x.desc.device, U.posDtype(x)
  local gy, gvgrid = gradOutput, nil
  if self.return_vgrid then
    if type(gradOutput) ~= 'table' or fa.isTensor(gradOutput) then
      E.argv(fn, 'gradOutput', 'a table {gradOutput, gradVgrid or nil} (return_vgrid)', gradOutput)
    end
    gy, gvgrid = gradOutput[1], gradOutput[2]
    if gvgrid ~= nil then nn._checkGradOutput(fn, gvgrid, x, { P, 2, Hk, Wk }, 'the sampling grid') end
  end
  nn._checkGradOutput(fn, gy, x, { B, dim, H, W })
  local child = U.childBackward(acc, scale)
  local c = self._const

  -- output projection, then the attention core
  local gO = child(self.to_out, self._o, gy)
  local gOa = buffer(self, '_gOa', { B, heads, N, D }, dt, dev):copy(gO:view(B, heads, D, N):transpose(3, 4))
  self._bopts = self._bopts or {}
  local bo = self._bopts
  bo.bias, bo.scale = self._aopts.bias, self._aopts.scale
  bo.dropout, bo.rng = self._aopts.dropout, self._rng
  bo.grad_q = buffer(self, '_gqa', { B, heads, N, D }, dt, dev)
  bo.grad_k = buffer(self, '_gka', { B, Hkv, M, D }, dt, dev)
  bo.grad_v = buffer(self, '_gva', { B, Hkv, M, D }, dt, dev)
  bo.grad_bias = buffer(self, '_gbias', { B, heads, N, M }, pdt, dev)
  fa.attention_backward(gOa, self._qa, self._ka, self._va, self._oa, self._lse, bo)
  bo.grad_q, bo.grad_k, bo.grad_v, bo.grad_bias = nil, nil, nil, nil

  -- the position bias: key-position gradient and the MLP's weight gradients (kept for accGradParameters)
  local w1, w2, w3 = self:_mlp()
  local cg = {}
  for i, e in ipairs({ w1.weight, w1.bias, w2.weight, w2.bias, w3.weight, w3.bias }) do
    cg[i] = buffer(self, '_gcpb' .. i, e:size(), e)
  end
  self._gcpb = cg
  local gkpos = buffer(self, '_gkpos', { P, M, 2 }, pdt, dev)
  fa.cpb_backward(self._gbias:view(P, heads / G, N, M), c.qpos, self._kpos:view(P, M, 2), w1.weight, w1.bias,
                  w2.weight, w2.bias, w3.weight, w3.bias, { grad_kpos = gkpos, grad_w1 = cg[1], grad_b1 = cg[2],
                  grad_w2 = cg[3], grad_b2 = cg[4], grad_w3 = cg[5], grad_b3 = cg[6] })
  if acc then self:_accCPB(scale) end

  -- keys and values -> the sampled features (the two gradients summed in to_k's gradInput)
  local gK = buffer(self, '_gK', { B, innerkv, Hk, Wk }, dt, dev)
  gK:view(B, Hkv, D, M):copy(self._gka:transpose(3, 4))
  local gV = buffer(self, '_gV', { B, innerkv, Hk, Wk }, dt, dev)
  gV:view(B, Hkv, D, M):copy(self._gva:transpose(3, 4))
  local gkv = child(self.to_k, self._kv, gK)
  gkv:add_(child(self.to_v, self._kv, gV))

  -- grid_sample: the input's gradient and the grid's
  local gxs = buffer(self, '_gxs', { B, dim, H, W }, dt, dev)
  local ggrid = buffer(self, '_ggrid', { P, Hk, Wk, 2 }, dt, dev)
  op.grid_sample_backward(fn, gkv:view(P, dim / G, Hk, Wk), x:view(P, dim / G, H, W), self._grid,
                          { grad_input = gxs:view(P, dim / G, H, W), grad_grid = ggrid }, self._pad, self._ac)
  -- both paths of the key positions, then d kpos / d t = coef (channels first again)
  local gpos = gkpos:view(P, Hk, Wk, 2)
  gpos:add_(pdt ~= dt and buffer(self, '_ggridPos', { P, Hk, Wk, 2 }, pdt, dev):copy(ggrid) or ggrid)
  local gT = buffer(self, '_gT', { P, 2, Hk, Wk }, dt, dev)
  gT:copy(gpos:permute(1, 4, 2, 3)):mul_(c.coef3)
  if gvgrid ~= nil then gT:add_(gvgrid, self.offset_scale) end
  local gQg = child(self.to_offsets, self.to_q.output:view(P, inner / G, H, W), gT)

  -- the queries: attention + offset network
  local gQ = buffer(self, '_gQ', { B, inner, H, W }, dt, dev)
  gQ:view(B, heads, D, N):copy(self._gqa:transpose(3, 4))
  gQ:add_(gQg:view(B, inner, H, W))
  local gx = child(self.to_q, x, gQ)
  gx:add_(gxs)
  self.gradInput = gx
  return gx
end

-- adds scale * the MLP's weight gradients that the backward left
function DA:_accCPB(scale)
  local w1, w2, w3 = self:_mlp()
  local cg = self._gcpb
  local g = { w1.gradWeight, w1.gradBias, w2.gradWeight, w2.gradBias, w3.gradWeight, w3.gradBias }
  for i = 1, 6 do g[i]:add_(cg[i], scale) end
end

function DA:updateGradInput(input, gradOutput)
  return self:_backward(self.__fnUpdateGradInput, input, gradOutput, 1, false)
end

-- uses what updateGradInput left (the Torch7 order: updateGradInput, then accGradParameters)
function DA:accGradParameters(input, gradOutput, scale)
  local fn = self.__fnAccGradParameters
  local x = self:_check(fn, input)
  scale = E.number(fn, 'scale', scale, true) or 1
  if self._gQ == nil or not self._gQ:isSameSizeAs(self.to_q.output) then
    E.fail(fn, 'call updateGradInput before accGradParameters')
  end
  local gy = self.return_vgrid and gradOutput[1] or gradOutput
  local P, inner = self._gT:size(1), self.heads * self.dim_head
  local H, W = self._size[2], self._size[3]
  self.to_out:accGradParameters(self._o, gy, scale)
  self:_accCPB(scale)
  self.to_k:accGradParameters(self._kv, self._gK, scale)
  self.to_v:accGradParameters(self._kv, self._gV, scale)
  self.to_offsets:accGradParameters(self.to_q.output:view(P, inner / self.offset_groups, H, W), self._gT, scale)
  self.to_q:accGradParameters(x, self._gQ, scale)
end

-- both in one pass (the children's fused backward calls)
function DA:backward(input, gradOutput, scale)
  return self:_backward(self.__fnBackward, input, gradOutput, E.number(self.__fnBackward, 'scale', scale, true) or 1,
                        true)
end

return DA
