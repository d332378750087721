-- train_deform_sdpa.lua: multi-view denoising with nn.DeformableSDPA, a task that needs learned sampling
-- points, and a picture of where the layer learned to look.
--
-- The task: --views noisy views of one synthetic textured scene (a fresh scene per sample). View 1 is the
-- reference; view v > 1 shows the scene displaced by a smooth field d_v (a translation of up to --shift
-- pixels plus a sine ripple), fixed for the whole run and never shown to the model. The model must
-- reconstruct the clean reference view. A single view can only be smoothed, which blurs the texture; the
-- other views hold the same texture with independent noise, but each at a displaced place, so a pixel of the
-- reference view must find its match q = p - d_v(q) in every view and average there.
--
-- Model: per pixel the features [noisy intensity, one-hot view, sin/cos of the position at 3 frequencies] ->
-- linear embedding (--dim) -> x + DeformableSDPA(x) (--heads heads, --samples points per view) -> MLP ->
-- the clean intensity of view 1; mean-squared error on view 1. The baseline is the same model with the
-- offset head frozen at its initialisation: every pixel reads every view at fixed points (its own
-- position and a small ring around it), so it cannot follow the displacement. Both are trained with AdamW,
-- a cosine schedule with warm-up and gradient clipping, on the same batches.
--
--   make demo-deform-sdpa                                (builds the library, then runs this with its defaults)
--   bin/fastattn examples/train_deform_sdpa.lua --help   (the options and their defaults)
--   e.g. on the GPU: bin/fastattn examples/train_deform_sdpa.lua --device cuda --size 32 --views 8 --batch 32
--
-- Prints a progress line every --every steps (step, loss, learning rate, samples/s), then on --test held-out
-- samples the mean-squared error of the learned model, of the baseline and of the noisy input, and how far
-- the nearest sampling point of each reference pixel lies from its true match in every other view (pixels).
-- Writes the loss curve (--plot) and the learned sampling points over a held-out reference view (--offsets,
-- SVG). Bad options are refused before training. Loaded with dofile() (as spec/train_deform_sdpa_spec.lua
-- does, with _G.__FASTATTN_NO_MAIN set) it runs nothing and returns its parts:
-- {cli, defaults, parseArgs, makeFields, displacement, match, makeBatch, makeModel, train, evaluate,
-- matchError, writeOffsets, main}.
local ffi = require 'ffi'
local fa = require 'fastattn'
local nn = fa.nn
local common = require 'examples.common'
local opt = common.opt

local M = {}

M.cli = {
  prog = 'train_deform_sdpa.lua',
  usage = 'bin/fastattn examples/train_deform_sdpa.lua [options]',
  about = 'trains a multi-view denoiser with nn.DeformableSDPA: the reference view of a synthetic textured scene\n' ..
          'is reconstructed from noisy views displaced by unknown per-view fields, against a fixed-coordinate baseline.',
  footer = '`make demo-deform-sdpa` runs it with the defaults (about 40 s on 2 CPU cores: both models).',
  options = {
    opt.steps(400), opt.batch(8, 'samples'), opt.lr(4e-3),
    { 'size', 'int', 16, min = 8, help = 'view side in pixels' },
    opt.device(),
    { 'views', 'int', 4, min = 2, help = 'views per sample (the reference and --views - 1 displaced ones)' },
    { 'samples', 'int', 4, min = 1, help = 'sampling points per query and view' },
    { 'dim', 'int', 32, min = 4, help = 'model width, a multiple of --heads' },
    { 'heads', 'int', 4, min = 1, help = 'attention heads' },
    { 'shift', 'number', 4, min = 0, help = 'largest translation of a view (pixels, per axis)' },
    { 'noise', 'number', 0.7, min = 0, help = 'noise standard deviation (the clean texture has 1)' },
    { 'baseline', 'choice', '1', choices = { '0', '1' }, help = 'also train the fixed-coordinate baseline (0: skip)' },
    opt.seed('scenes, fields'), opt.threads(),
    { 'test', 'int', 64, min = 1, help = 'held-out samples for the final metric' },
    opt.every(50), opt.clip(),
    opt.plot('deform_sdpa_loss.svg'),
    { 'offsets', 'path', common.outPath('deform_sdpa_offsets.svg'), none = true,
      help = "SVG file for the learned sampling points over a held-out reference view ('none': no picture)" },
  },
  check = function(o)
    if o.dim % o.heads ~= 0 then
      return string.format('option --dim: expected a multiple of --heads (%d), got %d', o.heads, o.dim)
    end
  end,
}
M.defaults = fa.util.defaults(M.cli)

---------------------------------------------------------------------------- the displacement fields
-- one field per view, drawn from o.seed alone (its own generator, so that the fields do not depend on what
-- else drew random numbers): view 1 none, view v > 1 a translation (tx, ty) in [-shift, shift] (at least
-- shift/2 long) plus a ripple of amplitude 0.15 shift along each axis. Cached in o.fields.
function M.makeFields(o)
  if o.fields then return o.fields end
  local state = (o.seed * 7919 + 12345) % 2147483647 + 1
  local function rnd() -- Park-Miller (exact in doubles)
    state = (state * 16807) % 2147483647
    return state / 2147483647
  end
  local f = { { tx = 0, ty = 0, a = 0, px = 0, py = 0 } }
  for v = 2, o.views do
    local tx, ty
    repeat
      tx, ty = (2 * rnd() - 1) * o.shift, (2 * rnd() - 1) * o.shift
    until math.sqrt(tx * tx + ty * ty) >= o.shift / 2
    f[v] = { tx = tx, ty = ty, a = 0.15 * o.shift, px = 2 * math.pi * rnd(), py = 2 * math.pi * rnd() }
  end
  o.fields = f
  return f
end

-- d_v at view pixel (x, y) (0-based column, row), in pixels
function M.displacement(fields, v, x, y, size)
  local f = fields[v]
  return f.tx + f.a * math.sin(2 * math.pi * y / size + f.px), f.ty + f.a * math.sin(2 * math.pi * x / size + f.py)
end

-- the pixel q of view v that shows what reference pixel (x, y) shows: q + d_v(q) = (x, y) (fixed point)
function M.match(fields, v, x, y, size)
  local qx, qy = x, y
  for _ = 1, 20 do
    local dx, dy = M.displacement(fields, v, qx, qy, size)
    qx, qy = x - dx, y - dy
  end
  return qx, qy
end

---------------------------------------------------------------------------- data
local FREQ = { 1, 2, 4 }
local function nfeat(V) return 1 + V + 4 * #FREQ end

-- a 1-d Gaussian kernel whose 2-d outer product has unit sum of squares: blurred unit white noise keeps std 1
local KR, KS = 3, 1.0
local KERNEL = (function()
  local k, ss = {}, 0
  for i = -KR, KR do
    k[i] = math.exp(-i * i / (2 * KS * KS))
    ss = ss + k[i] * k[i]
  end
  for i = -KR, KR do k[i] = k[i] / math.sqrt(ss) end
  return k
end)()

-- one pass of the separable blur over a C x C image, zero outside: along the rows (step 1) or the columns (step C)
local function blur(src, dst, C, step)
  for r = 0, C - 1 do
    for c = 0, C - 1 do
      local at = step == 1 and c or r -- the coordinate the pass runs along
      local s = 0
      for d = -KR, KR do
        if at + d >= 0 and at + d < C then s = s + KERNEL[d] * src[r * C + c + d * step] end
      end
      dst[r * C + c] = s
    end
  end
end

-- n samples: x (n, V, size, size, F) features (noisy intensity, one-hot view, position Fourier features) and
-- the targets t = {clean = (n, size, size, 1) the clean reference view, noisy = (n, size, size, 1) its noisy
-- input, views = (n, V, size, size) the clean views}. fa's RNG draws the texture and the noise.
function M.makeBatch(n, o, fields)
  local size, V = o.size, o.views
  local m = math.ceil(o.shift * 1.15) + 2 -- canvas margin: no view reads outside it
  local C = size + 2 * m
  local white = fa.randn(n, C, C):double()
  local pw = ffi.cast('double*', white.desc.data)
  local tmp, canvas = ffi.new('double[?]', C * C), ffi.new('double[?]', C * C)
  local views = fa.empty({ n, V, size, size }, 'float64')
  local pv = ffi.cast('double*', views.desc.data)
  for i = 0, n - 1 do
    blur(pw + i * C * C, tmp, C, 1)
    blur(tmp, canvas, C, C)
    for v = 1, V do -- view v at (x, y) shows the canvas at (x, y) + m + d_v(x, y), bilinearly
      local out = pv + ((i * V) + v - 1) * size * size
      for y = 0, size - 1 do
        for x = 0, size - 1 do
          local dx, dy = M.displacement(fields, v, x, y, size)
          local sx, sy = x + m + dx, y + m + dy
          local x0, y0 = math.floor(sx), math.floor(sy)
          local fx, fy = sx - x0, sy - y0
          local b = y0 * C + x0
          out[y * size + x] = (1 - fy) * ((1 - fx) * canvas[b] + fx * canvas[b + 1]) +
                              fy * ((1 - fx) * canvas[b + C] + fx * canvas[b + C + 1])
        end
      end
    end
  end
  local noisy = fa.randn(n, V, size, size):double():scale_(o.noise):add_(views)
  local F = nfeat(V)
  local x = fa.empty({ n, V, size, size, F }, 'float64')
  local px, pn = ffi.cast('double*', x.desc.data), ffi.cast('double*', noisy.desc.data)
  local pos = {}
  for y = 0, size - 1 do
    for xx = 0, size - 1 do
      local e = {}
      local u, w = 2 * xx / (size - 1) - 1, 2 * y / (size - 1) - 1
      for _, f in ipairs(FREQ) do
        e[#e + 1] = math.sin(math.pi * f * u / 2)
        e[#e + 1] = math.cos(math.pi * f * u / 2)
        e[#e + 1] = math.sin(math.pi * f * w / 2)
        e[#e + 1] = math.cos(math.pi * f * w / 2)
      end
      pos[y * size + xx] = e
    end
  end
  for i = 0, n - 1 do
    for v = 1, V do
      for p = 0, size * size - 1 do
        local base = (((i * V) + v - 1) * size * size + p) * F
        px[base] = pn[((i * V) + v - 1) * size * size + p]
        for j = 1, V do px[base + j] = j == v and 1 or 0 end
        local e = pos[p]
        for j = 1, #e do px[base + V + j] = e[j] end
      end
    end
  end
  local dt = fa.getDefaultDtype()
  local t = { views = views:to(dt), clean = views:select(2, 1):contiguous():view(n, size, size, 1):to(dt),
              noisy = noisy:select(2, 1):contiguous():view(n, size, size, 1):to(dt) }
  return x:to(dt), t
end

---------------------------------------------------------------------------- model
local Net = nn.class('TrainDeformSDPANet', nn.Module)

local buf = common.buffer

-- o.fixed: the offset head stays at its initialisation (its gradients are zeroed after every backward)
function Net:__init(o)
  nn.Module.__init(self)
  local d = o.dim
  self.fixed = o.fixed or false
  self:registerModule('embed', nn.Linear(nfeat(o.views), d))
  self:registerModule('attn', nn.DeformableSDPA{ dim = d, heads = o.heads, views = o.views, samples = o.samples })
  self:registerModule('head', nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1)))
end

-- x (n, V, size, size, F) -> the clean reference view (n, size, size, 1)
function Net:updateOutput(x)
  local e = self.embed:forward(x)
  self._h = buf(self, '_h', e):copy(e):add_(self.attn:forward(e))
  self._h1 = nn._buffer(self._h1, self._h:select(2, 1):size(), self._h):copy(self._h:select(2, 1))
  self.output = self.head:forward(self._h1)
  return self.output
end

function Net:backward(x, g)
  local gh1 = self.head:backward(self._h1, g)
  local gh = buf(self, '_gh', self._h):zero()
  gh:select(2, 1):copy(gh1)
  local ge = buf(self, '_ge', gh):copy(gh):add_(self.attn:backward(self.embed.output, gh))
  if self.fixed then
    self.attn.to_offsets.gradWeight:zero()
    self.attn.to_offsets.gradBias:zero()
  end
  self.gradInput = self.embed:backward(x, ge)
  return self.gradInput
end

function M.makeModel(o, fixed)
  local opts = common.withDefaults(M.defaults, o)
  opts.fixed = fixed
  return Net(opts)
end

---------------------------------------------------------------------------- train / evaluate
local function batchOnDevice(o, n, fields)
  local x, t = M.makeBatch(n, o, fields)
  if o.device == 'cuda' then x, t.clean, t.noisy = x:cuda(), t.clean:cuda(), t.noisy:cuda() end
  return x, t
end

-- trains `model` for o.steps steps (common.train) on the squared error of the reference view; returns the
-- per-step losses and the seconds it took
function M.train(model, o)
  local crit = nn.MSECriterion()
  return common.train(model, o, {
    label = model.fixed and 'baseline ' or '',
    unit = 'samples',
    batch = function(n) return batchOnDevice(o, n, M.makeFields(o)) end,
    loss = function(out, t)
      local l = crit:forward(out, t.clean)
      return l, crit:backward(out, t.clean)
    end,
  })
end

-- on n fresh samples: the mean-squared error of the model (loss) and of the noisy input (input)
function M.evaluate(model, o, n)
  local crit = nn.MSECriterion()
  local lsum, isum, total = 0, 0, 0
  common.heldOut(model, n, math.min(n, 16), function(m)
    local x, t = batchOnDevice(o, m, M.makeFields(o))
    lsum = lsum + crit:forward(model:forward(x), t.clean) * m
    isum = isum + crit:forward(t.noisy, t.clean) * m
    total = total + m
  end)
  return { loss = lsum / total, input = isum / total }
end

-- after a forward: per view v > 1, the mean over the reference pixels whose match lies inside the view of the
-- distance (pixels) from the true match to the nearest of the pixel's sampling points in view v, over the
-- batch; and the mean over the views
function M.matchError(model, o)
  local coords = model.attn:samplingPoints():to('float64', 'cpu') -- (B, V, N, V, S, 2)
  local B, V, S, size = coords:size(1), o.views, o.samples, o.size
  local pc = ffi.cast('double*', coords:contiguous().desc.data)
  local N = size * size
  local per, all = {}, 0
  for v = 2, V do
    local sum, cnt = 0, 0
    for b = 0, B - 1 do
      for p = 0, N - 1 do
        local x, y = p % size, math.floor(p / size)
        local qx, qy = M.match(M.makeFields(o), v, x, y, size)
        if qx >= 0 and qx <= size - 1 and qy >= 0 and qy <= size - 1 then
          local best = math.huge
          for s = 0, S - 1 do
            local i = ((((b * V) * N + p) * V + v - 1) * S + s) * 2 -- query view 1
            local dx, dy = pc[i] * (size - 1) - qx, pc[i + 1] * (size - 1) - qy
            best = math.min(best, math.sqrt(dx * dx + dy * dy))
          end
          sum, cnt = sum + best, cnt + 1
        end
      end
    end
    per[v] = sum / math.max(cnt, 1)
    all = all + per[v]
  end
  return all / (V - 1), per
end

---------------------------------------------------------------------------- the picture of the offsets
-- one panel per other view v (V - 1 panels): the clean reference view of sample 1 of x in grey and, for every
-- `every`-th reference pixel (a white ring), a line to each of its sampling points in view v (dots, the view's
-- colour) and the true match of the pixel in view v (a black cross). Coordinates in pixels: view v's points are
-- drawn on the reference's frame, so a learned point sits on its cross.
function M.writeOffsets(path, model, x, t, o, title, every)
  every = every or 3
  common.evalForward(model, x)
  local coords = model.attn:samplingPoints():to('float64', 'cpu'):select(1, 1) -- (V, N, V, S, 2)
  local fields = M.makeFields(o)
  local size, V, S = o.size, o.views, o.samples
  local img = t.clean:to('float64', 'cpu'):select(1, 1):view(size, size):table()
  local lo, hi = common.range(img)
  local px = 16
  local side, gap = size * px, 3 * px
  local Wt, Ht = (V - 1) * (side + gap) + gap, side + 6 * px
  local out = { string.format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d">',
                              Wt, Ht, Wt, Ht),
                string.format('<rect width="%d" height="%d" fill="white"/>', Wt, Ht),
                string.format('<text x="%d" y="%d" font-family="sans-serif" font-size="%d">%s</text>', gap, 2 * px,
                              px, common.xml(title or 'sampling points')) }
  local colours = common.COLOURS
  local cv = coords:table()
  local start = math.floor(every / 2)
  for v = 2, V do
    local ox, oy = gap + (v - 2) * (side + gap), 4 * px
    local col = colours[(v - 2) % #colours + 1]
    local function at(u, o0) return o0 + (u + 0.5) * px end -- pixel index -> SVG (pixel centres)
    out[#out + 1] = string.format('<text x="%d" y="%d" font-family="sans-serif" font-size="%d" fill="%s">view %d ' ..
                                  '(black +: true match)</text>', ox, oy - px / 2, px * 0.8, col, v)
    for r = 1, size do
      for c = 1, size do
        local g = math.floor(200 * (img[r][c] - lo) / math.max(hi - lo, 1e-9) + 30.5)
        out[#out + 1] = string.format('<rect x="%d" y="%d" width="%d" height="%d" fill="rgb(%d,%d,%d)"/>',
                                      ox + (c - 1) * px, oy + (r - 1) * px, px, px, g, g, g)
      end
    end
    for y = start, size - 1, every do
      for xx = start, size - 1, every do
        local p = y * size + xx
        local cx, cy = at(xx, ox), at(y, oy)
        for s = 1, S do
          local c = cv[1][p + 1][v][s]
          local sx, sy = at(c[1] * (size - 1), ox), at(c[2] * (size - 1), oy)
          out[#out + 1] = string.format('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="1.5"/>',
                                        cx, cy, sx, sy, col)
          out[#out + 1] = string.format('<circle cx="%.1f" cy="%.1f" r="%.1f" fill="%s"/>', sx, sy, px / 5, col)
        end
        local qx, qy = M.match(fields, v, xx, y, size)
        out[#out + 1] = string.format('<path d="M %.1f %.1f h %.1f M %.1f %.1f v %.1f" stroke="black" ' ..
                                      'stroke-width="2"/>', at(qx, ox) - px / 3, at(qy, oy), 2 * px / 3, at(qx, ox),
                                      at(qy, oy) - px / 3, 2 * px / 3)
        out[#out + 1] = string.format('<circle cx="%.1f" cy="%.1f" r="%.1f" fill="none" stroke="white" ' ..
                                      'stroke-width="1.5"/>', cx, cy, px / 4)
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
  M.makeFields(o)
  local model = M.makeModel(o)
  print(string.format('fastattn %s: multi-view denoiser, %d parameters (DeformableSDPA: %d views, %d samples per view, ' ..
                      '%d heads, dim %d), %s, %d threads', fa.version, model:getParameters():numel(), o.views, o.samples,
                      o.heads, o.dim, o.device, fa.getNumThreads()))
  print(string.format('task: reconstruct the clean reference view (%dx%d, noise %.2f) from %d views displaced by up to ' ..
                      '%.1f px', o.size, o.size, o.noise, o.views, o.shift))
  local losses, train_time = M.train(model, o)
  print(string.format('trained %d steps of %d samples in %.1f s', o.steps, o.batch, train_time))
  local base, base_time
  if o.baseline == '1' then
    common.seed(o.seed) -- the same initial weights and batches
    base = M.makeModel(o, true)
    local _
    _, base_time = M.train(base, o)
    print(string.format('trained the fixed-coordinate baseline in %.1f s', base_time))
  end
  math.randomseed(o.seed + 1000) -- held-out samples: other draws
  fa.manualSeed(o.seed + 1000)
  local r = M.evaluate(model, o, o.test)
  local line = string.format('held-out (%d samples) mean-squared error: learned offsets %.4f', o.test, r.loss)
  local rb
  if base then
    math.randomseed(o.seed + 1000)
    fa.manualSeed(o.seed + 1000)
    rb = M.evaluate(base, o, o.test)
    line = line .. string.format(', fixed coordinates %.4f', rb.loss)
  end
  print(line .. string.format(', noisy input %.4f', r.input))
  local x, t = batchOnDevice(o, math.min(o.test, 16), M.makeFields(o))
  common.evalForward(model, x)
  local err = M.matchError(model, o)
  line = string.format('nearest sampling point to the true match in the other views: learned %.2f px', err)
  if base then
    common.evalForward(base, x)
    line = line .. string.format(', fixed %.2f px', M.matchError(base, o))
  end
  print(line)
  common.plot(o.plot, losses, string.format('train_deform_sdpa: loss per step (%d steps, batch %d, %d views of %dx%d)',
                                            o.steps, o.batch, o.views, o.size, o.size))
  if o.offsets then
    local x1, t1 = batchOnDevice(o, 1, M.makeFields(o))
    M.writeOffsets(o.offsets, model, x1, t1, o, 'learned sampling points of reference pixels in the other views')
    print('sampling points written to ' .. o.offsets)
  end
  return r, rb, losses
end

return common.script(M, 'train_deform_sdpa.lua')
