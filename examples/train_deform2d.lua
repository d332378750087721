-- train_deform2d.lua: a small DAT-style classifier with nn.DeformableAttention2D (grouped-query attention)
-- trained end to end on synthetic images, and a picture of where the layer looks.
--
-- The task needs relations across the image: each image holds a cross and a filled square at random places on a
-- noisy background; the model tells whether the cross is left of the square. Each shape alone is easy to
-- recognise; the answer depends on where both are, so a location must gather where the other shape is: the
-- deformable attention's offsets move its sampling grid toward the shapes, and its relative position bias
-- (the CPB) tells the direction.
--
-- Model: a conv stem (two strided 3x3 convs: stride 4, 8x8 features at --size 32), --blocks blocks of
-- x + DeformableAttention2D(x) (GQA: --heads query heads over --kv_heads key/value heads, one offset group per
-- key/value head, downsample factor 2, so 4x4 sampled keys per offset group) and x + FFN(x) (1x1 conv, GELU, 1x1 conv), a mean over the positions
-- and a linear head (same / different). Trained with AdamW, a cosine schedule with warm-up and gradient
-- clipping.
--
--   make demo-deform2d                              (builds the library, then runs this with its defaults)
--   bin/fastattn examples/train_deform2d.lua --help   (the options and their defaults)
--   e.g. on the GPU: bin/fastattn examples/train_deform2d.lua --device cuda --size 64 --dim 64 --batch 128 --steps 2000
--
-- Prints a progress line every --every steps (step, loss, learning rate, images/s), the held-out accuracy on
-- --test images, writes the loss curve (--plot) and the learned sampling grid of the last block drawn over a
-- held-out image (--grid, SVG: per offset group, each key's reference point, its offset and the point it
-- samples). Bad options are refused before training. Loaded with dofile() (as spec/train_deform2d_spec.lua
-- does, with _G.__FASTATTN_NO_MAIN set) it runs nothing and returns its parts:
-- {cli, defaults, parseArgs, makeBatch, makeModel, train, evaluate, writeGrid, main}.
local ffi = require 'ffi'
local fa = require 'fastattn'
local nn = fa.nn
local common = require 'examples.common' -- the plumbing every example shares: option rows, training loop, plot
local opt = common.opt

local M = {}

M.cli = {
  prog = 'train_deform2d.lua',
  usage = 'bin/fastattn examples/train_deform2d.lua [options]',
  about = 'trains a small DAT-style classifier (conv stem, nn.DeformableAttention2D blocks with grouped-query\n' ..
          'attention) to tell whether the cross in a synthetic image is left of the square.',
  footer = '`make demo-deform2d` runs it with the defaults (about a minute on 2 CPU cores).',
  options = {
    opt.steps(1200), opt.batch(32), opt.lr(5e-3),
    { 'size', 'int', 32, min = 16, help = 'image side in pixels, a multiple of 8' },
    opt.device(),
    { 'blocks', 'int', 2, min = 1, help = 'attention blocks' },
    { 'dim', 'int', 32, min = 8, help = 'model width, a multiple of 4 and of --heads' },
    { 'heads', 'int', 4, min = 1, help = 'query heads' },
    { 'kv_heads', 'int', 2, min = 1, help = 'key/value heads (num_groups; also the offset groups), a divisor of --heads' },
    opt.seed(), opt.threads(),
    { 'test', 'int', 500, min = 1, help = 'held-out images for the final accuracy' },
    opt.every(50), opt.clip(),
    { 'noise', 'number', 0.2, min = 0, help = 'background noise (standard deviation)' },
    opt.plot('deform2d_loss.svg'),
    { 'grid', 'path', common.outPath('deform2d_grid.svg'), none = true,
      help = "SVG file for the learned sampling grid over a held-out image ('none': no picture)" },
  },
  check = function(o)
    if o.size % 8 ~= 0 then return string.format('option --size: expected a multiple of 8, got %d', o.size) end
    if o.dim % 4 ~= 0 or o.dim % o.heads ~= 0 then
      return string.format('option --dim: expected a multiple of 4 and of --heads (%d), got %d', o.heads, o.dim)
    end
    if o.heads % o.kv_heads ~= 0 or o.dim % o.kv_heads ~= 0 then
      return string.format('option --kv_heads: expected a divisor of --heads (%d) and of --dim (%d), got %d', o.heads,
                           o.dim, o.kv_heads)
    end
  end,
}
M.defaults = fa.util.defaults(M.cli)

---------------------------------------------------------------------------- data
-- draws shape `kind` (1..3) of side s with its top-left corner at (r0, c0) into the image at pointer img
local function draw(img, size, kind, r0, c0, s, bright)
  local mid = math.floor(s / 2)
  for r = 0, s - 1 do
    for c = 0, s - 1 do
      local on
      if kind == 1 then on = true
      elseif kind == 2 then on = r == 0 or c == 0 or r == s - 1 or c == s - 1
      else on = math.abs(r - mid) <= 0 or math.abs(c - mid) <= 0 end
      if on then
        local i = (r0 + r) * size + c0 + c
        img[i] = img[i] + bright
      end
    end
  end
end

-- n images (n, 1, size, size) with a cross and a square each, and the targets: label (n) int64, 2 = the cross
-- is left of the square, 1 = right of it; t.boxes[i] = {{row, col} of the cross, of the square}. Lua's RNG
-- places the shapes (math.randomseed), fa's the noise (fa.manualSeed).
function M.makeBatch(n, size, noise)
  size = size or 32
  local s = 2 * math.floor(size * 7 / 64) + 1 -- odd side: 7 px at size 32
  local x = fa.randn(n, 1, size, size):scale_(noise or 0.2)
  local px = ffi.cast('float*', x.desc.data)
  local label = fa.empty(n, 'int64')
  local pl = ffi.cast('int64_t*', label.desc.data)
  local t = { boxes = {}, n = n, size = size, label = label }
  local rnd = math.random
  for i = 1, n do
    local r1, c1, r2, c2
    repeat -- apart by at least 2 px, and by 3 columns (left or right is never a tie)
      r1, c1, r2, c2 = rnd(0, size - s), rnd(0, size - s), rnd(0, size - s), rnd(0, size - s)
    until (math.abs(r1 - r2) >= s + 2 or math.abs(c1 - c2) >= s + 2) and math.abs(c1 - c2) >= 3
    local img = px + (i - 1) * size * size
    draw(img, size, 3, r1, c1, s, 0.8 + 0.4 * rnd())
    draw(img, size, 1, r2, c2, s, 0.8 + 0.4 * rnd())
    t.boxes[i] = { { r1, c1 }, { r2, c2 } }
    pl[i - 1] = c1 < c2 and 2 or 1
  end
  return x, t
end

---------------------------------------------------------------------------- model
-- x + attn(x), then x + ffn(x); attn returns {y, vgrid} (return_vgrid: the grid is drawn, no gradient)
local Block = nn.class('TrainDeform2dBlock', nn.Module)

function Block:__init(o)
  nn.Module.__init(self)
  local d = o.dim
  self:registerModule('attn', nn.DeformableAttention2D{ dim = d, dim_head = d / o.heads, heads = o.heads,
    num_groups = o.kv_heads, offset_groups = o.kv_heads, downsample_factor = 2, offset_kernel_size = 4,
    return_vgrid = true })
  self:registerModule('ffn', nn.Sequential(nn.Conv2d(d, 2 * d, 1), nn.GELU(), nn.Conv2d(2 * d, d, 1)))
end

local buf = common.buffer

function Block:updateOutput(x)
  local a = self.attn:forward(x)[1]
  self._h = buf(self, '_h', x):copy(x):add_(a)
  self.output = buf(self, '_y', x):copy(self._h):add_(self.ffn:forward(self._h))
  return self.output
end

function Block:backward(x, g)
  local gh = buf(self, '_gh', x):copy(g):add_(self.ffn:backward(self._h, g))
  self._gin = self._gin or {}
  self._gin[1] = gh
  self.gradInput = buf(self, '_gx', x):copy(gh):add_(self.attn:backward(x, self._gin))
  return self.gradInput
end

local Net = nn.class('TrainDeform2dNet', nn.Module)

function Net:__init(o)
  nn.Module.__init(self)
  local d = o.dim
  self:registerModule('stem', nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, d, 3, 2, 1), nn.ReLU()))
  local blocks = {}
  for i = 1, o.blocks do blocks[i] = Block(o) end
  self:registerModule('blocks', nn.ModuleList(blocks))
  self:registerModule('head', nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 2)))
end

-- x (N, 1, size, size) -> logits (N, 2)
function Net:updateOutput(x)
  local f = self.stem:forward(x)
  self._in = { f }
  for i = 1, self.blocks:size() do
    f = self.blocks:get(i):forward(f)
    self._in[i + 1] = f
  end
  local N, C = f:size(1), f:size(2)
  self._pool = f:view(N, C, -1):mean(3, false)
  self.output = self.head:forward(self._pool)
  return self.output
end

function Net:backward(x, g)
  local f = self._in[#self._in]
  local N, C, Hf, Wf = f:size(1), f:size(2), f:size(3), f:size(4)
  local gp = self.head:backward(self._pool, g) -- (N, C); the mean spreads it over the positions
  self._gf = nn._buffer(self._gf, f:size(), f)
  self._gf:view(N, C, Hf * Wf):copy(gp:view(N, C, 1):expand(N, C, Hf * Wf)):scale_(1 / (Hf * Wf))
  local gf = self._gf
  for i = self.blocks:size(), 1, -1 do gf = self.blocks:get(i):backward(self._in[i], gf) end
  self.gradInput = self.stem:backward(x, gf)
  return self.gradInput
end

function M.makeModel(o) return Net(common.withDefaults(M.defaults, o)) end

---------------------------------------------------------------------------- train / evaluate
local function batchOnDevice(o, n)
  local x, t = M.makeBatch(n, o.size, o.noise)
  if o.device == 'cuda' then x, t.label = x:cuda(), t.label:cuda() end
  return x, t
end

-- trains `model` for o.steps steps (common.train: AdamW, cosine schedule, clipping, progress lines) on the
-- cross-entropy of the label; returns the per-step losses and the seconds it took
function M.train(model, o)
  local crit = nn.CrossEntropyCriterion()
  return common.train(model, o, {
    batch = function(n) return batchOnDevice(o, n) end,
    loss = function(out, t)
      local l = crit:forward(out, t.label)
      return l, crit:backward(out, t.label)
    end,
  })
end

-- on n fresh images: accuracy and mean loss
function M.evaluate(model, o, n)
  local crit = nn.CrossEntropyCriterion()
  local right, total, lsum, batches = 0, 0, 0, 0
  common.heldOut(model, n, math.min(n, 100), function(m)
    local x, t = batchOnDevice(o, m)
    local out = model:forward(x)
    lsum, batches = lsum + crit:forward(out, t.label), batches + 1
    local pred = out:argmax(2):view(-1):to(nil, 'cpu'):table()
    local lab = t.label:to(nil, 'cpu'):table()
    for i = 1, m do if pred[i] == lab[i] then right = right + 1 end end
    total = total + m
  end)
  return { accuracy = right / total, loss = lsum / batches }
end

---------------------------------------------------------------------------- the sampling grid picture
-- the image x (1, 1, size, size) in grey and, for each offset group of the last block's attention (a colour),
-- every key's reference point (a small ring), the offset (a line) and the sampled point (a dot), in image
-- pixels. The grid is the layer's vgrid (return_vgrid) mapped as grid_sample reads it.
function M.writeGrid(path, model, x, title)
  common.evalForward(model, x)
  local blocks = model.blocks
  local attn = blocks:get(blocks:size()).attn
  local vgrid = attn.output[2]:to('float64', 'cpu') -- (G, 2, Hk, Wk) for one image
  local size = x:size(3)
  local fmap = model._in[1]:size(3) -- feature side
  local stride = size / fmap
  local G, Hk, Wk = vgrid:size(1), vgrid:size(3), vgrid:size(4)
  local ax, ay = attn:_div(Hk, Wk)
  -- grid_sample (align_corners = false) reads feature column ix = vx * W / ax - 0.5 (pixel centres at k),
  -- i.e. image coordinate (ix + 0.5) * stride
  local function img_xy(vx, vy) return vx * fmap / ax * stride, vy * fmap / ay * stride end
  local img = x:to('float64', 'cpu'):view(size, size):table()
  local lo, hi = common.range(img)
  local px = 16 -- SVG units per image pixel
  local out = { string.format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="-%d -%d %d %d">',
                              size * px + 2 * px, size * px + 4 * px, px, 3 * px, size * px + 2 * px, size * px + 4 * px),
                string.format('<text x="0" y="-%d" font-family="sans-serif" font-size="%d">%s</text>', px, px,
                              common.xml(title or 'sampling grid')) }
  for r = 1, size do
    for c = 1, size do
      local v = math.floor(255 * (img[r][c] - lo) / math.max(hi - lo, 1e-9) + 0.5)
      out[#out + 1] = string.format('<rect x="%d" y="%d" width="%d" height="%d" fill="rgb(%d,%d,%d)"/>', (c - 1) * px,
                                    (r - 1) * px, px, px, v, v, v)
    end
  end
  local colours = common.COLOURS
  local vg = vgrid:table()
  for g = 1, G do
    local col = colours[(g - 1) % #colours + 1]
    for i = 1, Hk do
      for j = 1, Wk do
        local rx, ry = img_xy(j - 1, i - 1)
        local sx, sy = img_xy(vg[g][1][i][j], vg[g][2][i][j])
        out[#out + 1] = string.format('<circle cx="%.1f" cy="%.1f" r="%d" fill="none" stroke="%s" stroke-width="1.5"/>',
                                      rx * px, ry * px, px / 4, col)
        out[#out + 1] = string.format('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"/>',
                                      rx * px, ry * px, sx * px, sy * px, col)
        out[#out + 1] = string.format('<circle cx="%.1f" cy="%.1f" r="%d" fill="%s"/>', sx * px, sy * px, px / 3, col)
      end
    end
  end
  common.writeSvg(path, out)
end

---------------------------------------------------------------------------- main
function M.parseArgs(args) return fa.util.parseArgs(M.cli, args) end

function M.main(args)
  local o = fa.util.cli(M.cli, args)
  common.seed(o.seed)
  local model = M.makeModel(o)
  print(string.format('fastattn %s: DAT-style classifier, %d parameters (%d DeformableAttention2D block%s, dim %d, ' ..
                      '%d query heads over %d key/value heads), %s, %d threads', fa.version,
                      model:getParameters():numel(), o.blocks, o.blocks == 1 and '' or 's', o.dim, o.heads, o.kv_heads,
                      o.device, fa.getNumThreads()))
  print(string.format('task: is the cross left of the square? (%dx%d noisy images, shapes at random places)', o.size,
                      o.size))
  local losses, train_time = M.train(model, o)
  math.randomseed(o.seed + 1000) -- held-out images: other draws
  local r = M.evaluate(model, o, o.test)
  print(string.format('trained %d steps of %d images in %.1f s', o.steps, o.batch, train_time))
  print(string.format('held-out (%d images): accuracy %.1f%% (chance 50%%), loss %.3f', o.test, 100 * r.accuracy,
                      r.loss))
  common.plot(o.plot, losses, string.format('train_deform2d: loss per step (%d steps, batch %d, size %d)', o.steps,
                                            o.batch, o.size))
  if o.grid then
    local x, t = batchOnDevice(o, 1)
    M.writeGrid(o.grid, model, x, string.format('last block: sampling points per offset group (cross %s of the square)',
                                                t.label:table()[1] == 2 and 'left' or 'right'))
    print('sampling grid written to ' .. o.grid)
  end
  return r, losses
end

return common.script(M, 'train_deform2d.lua')
