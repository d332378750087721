-- train_msda.lua: a small Deformable-DETR-style model trained end to end on synthetic images.
--
-- The task needs multi-scale sampling: each image holds one bright disc whose radius varies a lot
-- (1 to 12 px at --size 64, log-uniform; scaled with --size) on a noisy background. The model finds the
-- disc's centre and tells its size class (small r < 2.5, medium r < 6, large; the bounds scale with
-- --size too). A disc of radius 1 shows only at the finest level; a disc of radius 12 covers a dozen
-- cells of it, whose features look the same inside, so a cell can only tell that it is the centre
-- (and how large the disc is) by sampling the coarser levels and its surroundings: that is what the
-- MSDA encoder does.
--
-- Model: a conv backbone of strided 3x3 convs gives 4 feature levels (strides 4, 8, 16, 32: 16x16,
-- 8x8, 4x4, 2x2 at --size 64), each projected to d_model by a 1x1 conv and flattened into one token
-- sequence with fixed sine position codes plus a fixed code per level; --layers encoder layers, each
-- nn.MSDeformAttn (queries = every token, reference point = its cell centre on every level) + residual +
-- LayerNorm + a ReLU FFN + residual + LayerNorm, as Deformable DETR's encoder layer; a per-cell linear head
-- on the finest level: a centre logit (softmax over the cells: cross-entropy with the cell that holds the
-- centre), the centre's offset inside its cell (MSE) and the size-class logits (cross-entropy), both read
-- at the true cell. Prediction: the cell of the highest centre logit, plus its offset; its size class.
-- Trained with AdamW, a cosine schedule with warm-up and gradient clipping.
--
--   make demo                                  (builds the library, then runs this with its defaults)
--   bin/fastattn examples/train_msda.lua --help  (the options and their defaults)
--   e.g. on the GPU: bin/fastattn examples/train_msda.lua --device cuda --size 128 --batch 64 --steps 1500 --layers 2
--
-- Prints a progress line every --every steps (step, loss, learning rate, images/s), the final metric on
-- --test held-out images (mean centre error in px, size-class accuracy), and writes the loss curve as an
-- SVG file (--plot; its path is printed). Bad options are refused before training. Loaded with dofile() (as
-- spec/train_msda_spec.lua does, with _G.__FASTATTN_NO_MAIN set) it runs nothing and returns its parts:
-- {cli, defaults, parseArgs, makeBatch, makeModel, train, evaluate, main}.
local ffi = require 'ffi'
local fa = require 'fastattn'
local nn = fa.nn
local common = require 'examples.common' -- the plumbing every example shares: option rows, training loop, plot
local opt = common.opt

local M = {}
local K = 3 -- size classes
local CLASS_NAMES = { 'small', 'medium', 'large' }
local NLEVELS = 4

-- the command line (fa.util.parseArgs): options, defaults, ranges, help
M.cli = {
  prog = 'train_msda.lua',
  usage = 'bin/fastattn examples/train_msda.lua [options]',
  about = 'trains a small Deformable-DETR-style model (conv backbone, 4 feature levels, nn.MSDeformAttn\n' ..
          'encoder layers) to find one disc of varying size in synthetic noisy images: its centre and size class.',
  footer = '`make demo` runs it with the defaults (about 30 s on 2 CPU cores).',
  options = {
    opt.steps(600), opt.batch(24), opt.lr(2e-3),
    { 'size', 'int', 64, min = 32, help = 'image side in pixels, a multiple of 32' },
    opt.device(),
    { 'layers', 'int', 1, min = 1, help = 'MSDA encoder layers' },
    { 'd_model', 'int', 32, min = 4, help = 'model width, a multiple of 4 and of --heads' },
    { 'heads', 'int', 4, min = 1, help = 'attention heads' },
    { 'points', 'int', 4, min = 1, help = 'sampling points per head and level' },
    opt.seed(), opt.threads(),
    { 'test', 'int', 400, min = 1, help = 'held-out images for the final metric' },
    opt.every(50), opt.clip(),
    { 'noise', 'number', 0.15, min = 0, help = 'background noise (standard deviation)' },
    { 'offset_weight', 'number', 4, min = 0, help = 'weight of the centre-offset loss' },
    opt.plot('msda_loss.svg'),
  },
  check = function(o)
    if o.size % 32 ~= 0 then
      return string.format('option --size: expected a multiple of 32 (4 levels, stride 32), got %d', o.size)
    end
    if o.d_model % 4 ~= 0 or o.d_model % o.heads ~= 0 then
      return string.format('option --d_model: expected a multiple of 4 and of --heads (%d), got %d', o.heads, o.d_model)
    end
  end,
}
M.defaults = fa.util.defaults(M.cli)

---------------------------------------------------------------------------- data
-- radius range and class bounds at image size `size` (those of size 64, scaled)
local function geometry(size)
  local s = size / 64
  return { rmin = 1 * s, rmax = 12 * s, small = 2.5 * s, medium = 6 * s }
end

-- n images (n, 1, size, size) with one anti-aliased disc each, and their targets: Lua arrays cx, cy
-- (pixel units, pixel k spans [k, k+1)), r, cls (1..K). Lua's RNG decides the discs (math.randomseed),
-- fa's the noise (fa.manualSeed).
function M.makeBatch(n, size, noise)
  size = size or 64
  local g = geometry(size)
  local x = fa.randn(n, 1, size, size):scale_(noise or 0.15)
  local px = ffi.cast('float*', x.desc.data)
  local t = { cx = {}, cy = {}, r = {}, cls = {}, n = n, size = size }
  local rnd, lmin, lmax = math.random, math.log(g.rmin), math.log(g.rmax)
  for i = 1, n do
    local r = math.exp(lmin + (lmax - lmin) * rnd())
    local margin = math.min(r, size / 4)
    local cx = margin + (size - 2 * margin) * rnd()
    local cy = margin + (size - 2 * margin) * rnd()
    t.cx[i], t.cy[i], t.r[i] = cx, cy, r
    t.cls[i] = r < g.small and 1 or (r < g.medium and 2 or 3)
    local img = px + (i - 1) * size * size
    local bright = 0.8 + 0.4 * rnd()
    for row = math.max(0, math.floor(cy - r - 1)), math.min(size - 1, math.floor(cy + r + 1)) do
      for col = math.max(0, math.floor(cx - r - 1)), math.min(size - 1, math.floor(cx + r + 1)) do
        local dx, dy = col + 0.5 - cx, row + 0.5 - cy
        local cover = r + 0.5 - math.sqrt(dx * dx + dy * dy) -- anti-aliased edge, 1 px wide
        if cover > 0 then
          img[row * size + col] = img[row * size + col] + bright * math.min(cover, 1)
        end
      end
    end
  end
  return x, t
end

---------------------------------------------------------------------------- model
-- one encoder layer of Deformable DETR (post-norm): src = norm1(src + attn(src + pos, ref, src));
-- src = norm2(src + linear2(relu(linear1(src))))
local EncoderLayer = nn.class('TrainMSDAEncoderLayer', nn.Module)

function EncoderLayer:__init(d, ffn, heads, points)
  nn.Module.__init(self)
  self:registerModule('self_attn', nn.MSDeformAttn{ d_model = d, n_levels = NLEVELS, n_heads = heads, n_points = points })
  self:registerModule('norm1', nn.LayerNorm(d))
  self:registerModule('linear1', nn.Linear(d, ffn))
  self:registerModule('activation', nn.ReLU())
  self:registerModule('linear2', nn.Linear(ffn, d))
  self:registerModule('norm2', nn.LayerNorm(d))
end

local buf = common.buffer

-- input {src (N, S, d), pos (1, S, d), ref (N, S, L, 2), shapes, lsi} -> (N, S, d)
function EncoderLayer:updateOutput(input)
  local src, pos, ref, shapes, lsi = unpack(input, 1, 5)
  local q = buf(self, '_q', src):copy(src):add_(pos)
  self._attnIn = { q, ref, src, shapes, lsi }
  local a = self.self_attn:forward(self._attnIn)
  local r1 = buf(self, '_r1', src):copy(src):add_(a)
  local s1 = self.norm1:forward(r1)
  local h = self.activation:forward(self.linear1:forward(s1))
  local r2 = buf(self, '_r2', src):copy(s1):add_(self.linear2:forward(h))
  self.output = self.norm2:forward(r2)
  return self.output
end

-- gradient with respect to src (pos, ref and the levels get none); adds the parameter gradients
function EncoderLayer:backward(input, gradOutput)
  local src = input[1]
  local gR2 = self.norm2:backward(self._r2, gradOutput)
  local gH = self.linear2:backward(self.activation.output, gR2)
  local gL1 = self.activation:backward(self.linear1.output, gH)
  local gS1 = buf(self, '_gS1', src):copy(gR2):add_(self.linear1:backward(self.norm1.output, gL1))
  local gR1 = self.norm1:backward(self._r1, gS1)
  local g = self.self_attn:backward(self._attnIn, gR1) -- {query, reference_points, input_flatten}
  self.gradInput = buf(self, '_gSrc', src):copy(gR1):add_(g[1]):add_(g[3])
  return self.gradInput
end

local Net = nn.class('TrainMSDANet', nn.Module)

function Net:__init(o)
  nn.Module.__init(self)
  local d = o.d_model
  self.d = d
  local function conv(i, out) return nn.Sequential(nn.Conv2d(i, out, 3, 2, 1), nn.ReLU()) end
  self:registerModule('stem', nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU()))
  self:registerModule('down1', conv(32, 48))  -- stride 8
  self:registerModule('down2', conv(48, 64))  -- stride 16
  self:registerModule('down3', conv(64, 64))  -- stride 32
  self.channels = { 32, 48, 64, 64 }
  local proj = {}
  for l = 1, NLEVELS do proj[l] = nn.Conv2d(self.channels[l], d, 1) end
  self:registerModule('input_proj', nn.ModuleList(proj))
  local layers = {}
  for i = 1, o.layers do layers[i] = EncoderLayer(d, 2 * d, o.heads, o.points) end
  self:registerModule('layers', nn.ModuleList(layers))
  self:registerModule('head', nn.Linear(d, 3 + K)) -- centre logit, offset (x, y), size logits
end

-- fixed position codes (1, S, d) and reference points (1, S, L, 2) for the level shapes, cached
function Net:_grid(shapes, like)
  local key = {}
  for l, hw in ipairs(shapes) do key[l] = hw[1] .. 'x' .. hw[2] end
  key = table.concat(key, ',') .. like:device() .. like:dtype()
  if self._gridKey == key then return self._pos, self._ref end
  local d, S = self.d, 0
  for _, hw in ipairs(shapes) do S = S + hw[1] * hw[2] end
  local pos, ref = fa.empty(1, S, d, 'float64'), fa.empty(1, S, NLEVELS, 2, 'float64')
  local pp, pr = ffi.cast('double*', pos.desc.data), ffi.cast('double*', ref.desc.data)
  local tok = 0
  local nf = d / 4 -- frequencies per coordinate (sin and cos of x and y)
  for l, hw in ipairs(shapes) do
    local H, W = hw[1], hw[2]
    for i = 0, H - 1 do
      for j = 0, W - 1 do
        local x, y = (j + 0.5) / W, (i + 0.5) / H
        for k = 0, nf - 1 do
          local f = math.pi * 2 ^ (k * 4 / nf)
          pp[tok * d + 4 * k] = math.sin(x * f)
          pp[tok * d + 4 * k + 1] = math.cos(x * f)
          pp[tok * d + 4 * k + 2] = math.sin(y * f)
          pp[tok * d + 4 * k + 3] = math.cos(y * f)
        end
        -- a level code: a fixed pattern per level, added on top
        for c = 0, d - 1 do pp[tok * d + c] = pp[tok * d + c] + 0.5 * math.cos(1.7 * (c + 1) * l) end
        for lv = 0, NLEVELS - 1 do
          pr[(tok * NLEVELS + lv) * 2], pr[(tok * NLEVELS + lv) * 2 + 1] = x, y
        end
        tok = tok + 1
      end
    end
  end
  self._pos = pos:to(like:dtype(), like:device())
  self._ref = ref:to(like:dtype(), like:device())
  self._gridKey = key
  return self._pos, self._ref
end

-- x (N, 1, size, size) -> head output (N, H1*W1, 3 + K) over the cells of the finest level
function Net:updateOutput(x)
  local N = x:size(1)
  local f = {}
  f[1] = self.stem:forward(x)
  f[2] = self.down1:forward(f[1])
  f[3] = self.down2:forward(f[2])
  f[4] = self.down3:forward(f[3])
  self._f = f
  local shapes, S = {}, 0
  for l = 1, NLEVELS do
    shapes[l] = { f[l]:size(3), f[l]:size(4) }
    S = S + shapes[l][1] * shapes[l][2]
  end
  self.shapes = shapes
  -- src (N, S, d): the projected levels, flattened row-major and concatenated
  self._src = nn._buffer(self._src, { N, S, self.d }, x)
  local start = 0
  for l = 1, NLEVELS do
    local hw = shapes[l][1] * shapes[l][2]
    local p = self.input_proj:get(l):forward(f[l])
    self._src:narrow(2, start + 1, hw):copy(p:view(N, self.d, hw):transpose(2, 3))
    start = start + hw
  end
  local pos, ref = self:_grid(shapes, x)
  ref = ref:expand(N, S, NLEVELS, 2)
  local src = self._src
  self._layerIn = {}
  for i = 1, self.layers:size() do
    self._layerIn[i] = { src, pos, ref, shapes, nil }
    src = self.layers:get(i):forward(self._layerIn[i])
  end
  self._top = src:narrow(2, 1, shapes[1][1] * shapes[1][2])
  self.output = self.head:forward(self._top)
  return self.output
end

function Net:backward(x, gradOutput)
  local N, shapes = x:size(1), self.shapes
  local gTop = self.head:backward(self._top, gradOutput)
  local g = nn._buffer(self._gSrc, self._src:size(), x)
  self._gSrc = g
  g:zero():narrow(2, 1, gTop:size(2)):copy(gTop)
  for i = self.layers:size(), 1, -1 do
    g = self.layers:get(i):backward(self._layerIn[i], g)
  end
  -- split the token gradient back into the levels, through the 1x1 projections, then the backbone
  self._gF = self._gF or {}
  local gF, start = {}, 0
  for l = 1, NLEVELS do
    local hw = shapes[l][1] * shapes[l][2]
    local gp = nn._buffer(self._gF[l], { N, self.d, shapes[l][1], shapes[l][2] }, x)
    self._gF[l] = gp
    gp:view(N, self.d, hw):copy(g:narrow(2, start + 1, hw):transpose(2, 3))
    gF[l] = self.input_proj:get(l):backward(self._f[l], gp)
    start = start + hw
  end
  local f = self._f
  local g3 = self.down3:backward(f[3], gF[4])
  local g2 = self.down2:backward(f[2], gF[3]:add_(g3))
  local g1 = self.down1:backward(f[1], gF[2]:add_(g2))
  self.gradInput = self.stem:backward(x, gF[1]:add_(g1))
  return self.gradInput
end

function M.makeModel(o) return Net(common.withDefaults(M.defaults, o)) end

---------------------------------------------------------------------------- loss
-- the targets of a batch on the finest level (H1 x W1 cells of `stride` px): 1-based cell indices
-- (N) int64, offsets inside the cell (N, 2) in [0, 1), classes (N) int64, and the one-hot (N, 1, H1*W1)
local function targets(t, H1, W1, like)
  local n, size = t.n, t.size
  local sx, sy = size / W1, size / H1
  local cell, off, cls = fa.empty(n, 'int64'), fa.empty(n, 2, 'float64'), fa.empty(n, 'int64')
  local onehot = fa.zeros(n, 1, H1 * W1, 'float64')
  local pc, po, pk = ffi.cast('int64_t*', cell.desc.data), ffi.cast('double*', off.desc.data),
      ffi.cast('int64_t*', cls.desc.data)
  local ph = ffi.cast('double*', onehot.desc.data)
  for i = 1, n do
    local gx, gy = t.cx[i] / sx, t.cy[i] / sy
    local j, k = math.min(W1 - 1, math.floor(gx)), math.min(H1 - 1, math.floor(gy))
    pc[i - 1] = k * W1 + j + 1
    po[2 * (i - 1)], po[2 * (i - 1) + 1] = gx - j, gy - k
    pk[i - 1] = t.cls[i]
    ph[(i - 1) * H1 * W1 + k * W1 + j] = 1
  end
  local dev, dt = like:device(), like:dtype()
  return cell:to(nil, dev), off:to(dt, dev), cls:to(nil, dev), onehot:to(dt, dev)
end

-- loss of head output `out` (N, C, 3 + K) against targets; fills gradOut when given. Returns the loss and
-- its parts.
local Loss = {}
Loss.__index = Loss
local function newLoss(offsetWeight)
  return setmetatable({ heat = nn.CrossEntropyCriterion(), size = nn.CrossEntropyCriterion(),
                        off = nn.MSECriterion(), w = offsetWeight }, Loss)
end

function Loss:forward(out, tg)
  local N, C = out:size(1), out:size(2)
  self._heat = nn._buffer(self._heat, { N, C }, out):copy(out:select(3, 1))
  -- the row of each image's true cell: onehot (N, 1, C) @ out (N, C, 3 + K)
  self._picked = tg.onehot:matmul(out):view(N, 3 + K)
  self._offIn = nn._buffer(self._offIn, { N, 2 }, out):copy(self._picked:narrow(2, 2, 2))
  self._clsIn = nn._buffer(self._clsIn, { N, K }, out):copy(self._picked:narrow(2, 4, K))
  local lh = self.heat:forward(self._heat, tg.cell)
  local lo = self.off:forward(self._offIn, tg.off)
  local ls = self.size:forward(self._clsIn, tg.cls)
  return lh + self.w * lo + ls, lh, lo, ls
end

function Loss:backward(out, tg)
  local N, C = out:size(1), out:size(2)
  local gp = nn._buffer(self._gPicked, { N, 1, 3 + K }, out)
  self._gPicked = gp
  gp:select(3, 1):zero()
  gp:view(N, 3 + K):narrow(2, 2, 2):copy(self.off:backward(self._offIn, tg.off)):scale_(self.w)
  gp:view(N, 3 + K):narrow(2, 4, K):copy(self.size:backward(self._clsIn, tg.cls))
  local g = tg.onehot:transpose(2, 3):matmul(gp) -- (N, C, 3 + K)
  g:select(3, 1):copy(self.heat:backward(self._heat, tg.cell))
  return g
end

---------------------------------------------------------------------------- train / evaluate
local function batchOnDevice(o, n)
  local x, t = M.makeBatch(n, o.size, o.noise)
  if o.device == 'cuda' then x = x:cuda() end
  return x, t
end

local function targetsFor(model, t, like)
  local s1 = model.shapes[1]
  local cell, off, cls, onehot = targets(t, s1[1], s1[2], like)
  return { cell = cell, off = off, cls = cls, onehot = onehot }
end

-- trains `model` for o.steps steps (o: the options of M.defaults; common.train: AdamW, cosine schedule, clipping,
-- progress lines); returns the per-step losses and the seconds it took
function M.train(model, o)
  local loss = newLoss(o.offset_weight or M.defaults.offset_weight)
  return common.train(model, o, {
    batch = function(n) return batchOnDevice(o, n) end,
    loss = function(out, t)
      local tg = targetsFor(model, t, out)
      local l = loss:forward(out, tg)
      return l, loss:backward(out, tg)
    end,
  })
end

-- on n fresh images: mean centre error (px), size-class accuracy, fraction within 2 px (at size 64,
-- scaled), and the mean loss
function M.evaluate(model, o, n)
  local loss = newLoss(o.offset_weight or M.defaults.offset_weight)
  local err, right, near, total, lsum, batches = 0, 0, 0, 0, 0, 0
  common.heldOut(model, n, math.min(n, 100), function(m)
    local x, t = batchOnDevice(o, m)
    local out = model:forward(x)
    local tg = targetsFor(model, t, out)
    lsum, batches = lsum + loss:forward(out, tg), batches + 1
    local H1, W1 = model.shapes[1][1], model.shapes[1][2]
    local sx, sy = o.size / W1, o.size / H1
    local cpu = out:to('float64', 'cpu')
    local cell = cpu:select(3, 1):argmax(2):view(-1):table()
    for i = 1, m do
      local c = cell[i] - 1
      local row = cpu:select(1, i):select(1, c + 1):table()
      local px = (c % W1 + row[2]) * sx
      local py = (math.floor(c / W1) + row[3]) * sy
      local e = math.sqrt((px - t.cx[i]) ^ 2 + (py - t.cy[i]) ^ 2)
      err = err + e
      if e <= 2 * o.size / 64 then near = near + 1 end
      local best = 1
      for k = 2, K do if row[3 + k] > row[3 + best] then best = k end end
      if best == t.cls[i] then right = right + 1 end
    end
    total = total + m
  end)
  return { centre_error = err / total, size_accuracy = right / total, within2 = near / total, loss = lsum / batches }
end

---------------------------------------------------------------------------- main
-- args (a list of strings) -> the options, or nil and the message
function M.parseArgs(args) return fa.util.parseArgs(M.cli, args) end

-- runs the example with the command line args; --help and bad options end the script here (fa.util.cli)
function M.main(args)
  local o = fa.util.cli(M.cli, args)
  common.seed(o.seed)
  local model = M.makeModel(o)
  local nparams = model:getParameters():numel()
  local g = geometry(o.size)
  print(string.format('fastattn %s: Deformable-DETR-style model, %d parameters (%d MSDA encoder layer%s, d_model %d, ' ..
                      '%d heads, %d levels, %d points), %s, %d threads', fa.version, nparams, o.layers,
                      o.layers == 1 and '' or 's', o.d_model, o.heads, NLEVELS, o.points, o.device, fa.getNumThreads()))
  print(string.format('task: find one disc of radius %.0f..%.0f px in %dx%d noisy images; its centre and size class ' ..
                      '(%s: r < %.1f, r < %.1f, larger)', g.rmin, g.rmax, o.size, o.size, table.concat(CLASS_NAMES, '/'),
                      g.small, g.medium))
  local losses, train_time = M.train(model, o)
  math.randomseed(o.seed + 1000) -- held-out images: other draws
  local r = M.evaluate(model, o, o.test)
  print(string.format('trained %d steps of %d images in %.1f s', o.steps, o.batch, train_time))
  print(string.format('held-out (%d images): mean centre error %.2f px (%.0f%% within %.0f px), size-class accuracy %.1f%%, loss %.3f',
                      o.test, r.centre_error, 100 * r.within2, 2 * o.size / 64, 100 * r.size_accuracy, r.loss))
  common.plot(o.plot, losses, string.format('train_msda: loss per step (%d steps, batch %d, size %d)', o.steps, o.batch,
                                            o.size))
  return r, losses
end

-- run as a script (bin/fastattn examples/train_msda.lua ...), or return the parts to dofile()
return common.script(M, 'train_msda.lua')
