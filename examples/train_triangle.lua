-- train_triangle.lua: a small pair-representation model with triangle attention, trained on synthetic chains.
--
-- The task needs triangle reasoning: each sample is a random 3-D chain of L points (a random walk of unit
-- steps, L between --n/2 and --n, padded to --n), and the model sees a noisy distance for a random subset of the
-- pairs (--obs of them; always the bonded neighbours) and the chain separation |i - j| of every pair. It
-- predicts the distance of every pair. For an unseen pair the separation alone tells little (a random walk's
-- distance spreads widely: about sqrt(|i - j|)); the seen distances d(i, k) and d(k, j) through a third point k
-- bound it (|d(i,k) - d(k,j)| <= d(i,j) <= d(i,k) + d(k,j)). Triangle attention is the layer that lets pair (i, j)
-- read pairs (i, k) and (k, j).
--
-- Model: an embedding of the pair features (Linear), --blocks blocks of nn.TriangleAttention around the starting
-- node + residual, around the ending node + residual, and a transition MLP (LayerNorm, Linear 4x, ReLU, Linear)
-- + residual, as in AlphaFold's pair stack; a head (LayerNorm, Linear) gives the distance. The attention mask is
-- the pair mask of the padded chains (padding rows are fully masked: the select mask gives them mean(V), never
-- NaN). The loss is the mean squared error over the real pairs. The baseline is the same model without the
-- triangle blocks (embedding, transitions, head: each pair on its own), trained the same way.
--
--   make demo-triangle                            (builds the library, then runs this with its defaults)
--   bin/fastattn examples/train_triangle.lua --help  (the options and their defaults)
--   e.g. on the GPU: bin/fastattn examples/train_triangle.lua --device cuda --n 64 --batch 32 --c_z 64 --steps 1500
--
-- Prints a progress line every --every steps (step, loss, learning rate, samples/s), then for the triangle model
-- and the baseline the held-out RMSE of the distances of the unseen pairs (and of all pairs), and writes the
-- triangle model's loss curve as an SVG file (--plot; its path is printed). Bad options are refused before
-- training. Loaded with dofile() (as spec/train_triangle_spec.lua does, with _G.__FASTATTN_NO_MAIN set) it runs
-- nothing and returns its parts: {cli, defaults, parseArgs, makeBatch, makeModel, train, evaluate, main}.
local ffi = require 'ffi'
local fa = require 'fastattn'
local nn = fa.nn
local common = require 'examples.common' -- the plumbing every example shares: option rows, training loop, plot
local opt = common.opt

local M = {}
local NFEAT = 6

M.cli = {
  prog = 'train_triangle.lua',
  usage = 'bin/fastattn examples/train_triangle.lua [options]',
  about = 'trains a small pair model with triangle attention (nn.TriangleAttention, starting and ending node) to\n' ..
          'recover the full distance matrix of random 3-D chains from a subset of noisy distances, against a\n' ..
          'baseline without the triangle blocks.',
  footer = '`make demo-triangle` runs it with the defaults (about a minute on 2 CPU cores).',
  options = {
    opt.steps(300, 'training steps (each model)'), opt.batch(16, 'chains'), opt.lr(3e-3),
    { 'n', 'int', 16, min = 4, help = 'points per chain (padded size; chains have n/2..n points)' },
    { 'obs', 'number', 0.35, min = 0, max = 1, help = 'fraction of the non-bonded pairs whose distance is seen' },
    { 'noise', 'number', 0.1, min = 0, help = 'noise on the seen distances (standard deviation, in steps)' },
    opt.device(),
    { 'blocks', 'int', 2, min = 1, help = 'pair blocks (triangle start + end + transition)' },
    { 'c_z', 'int', 32, min = 2, help = 'pair representation width' },
    { 'heads', 'int', 4, min = 1, help = 'triangle attention heads' },
    { 'c_hidden', 'int', 8, min = 1, help = 'triangle attention width per head' },
    opt.seed('chains'), opt.threads(),
    { 'test', 'int', 200, min = 1, help = 'held-out chains for the final metric' },
    opt.every(50), opt.clip(),
    { 'no_baseline', 'flag', nil, help = 'skip the baseline (the same model without the triangle blocks)' },
    opt.plot('triangle_loss.svg'),
  },
}
M.defaults = fa.util.defaults(M.cli)

---------------------------------------------------------------------------- data
-- n chains padded to size N: features (n, N, N, NFEAT), pair mask (n, N, N) (1 = both points exist), target
-- distances (n, N, N), the weights of the loss (n, N, N: real pairs i ~= j) and of the metric on unseen pairs.
-- Lua's RNG decides everything (math.randomseed).
function M.makeBatch(n, N, obs, noise)
  N, obs, noise = N or 16, obs or 0.35, noise or 0.1
  local feat = fa.zeros(n, N, N, NFEAT, 'float64')
  local mask, dist = fa.zeros(n, N, N, 'float64'), fa.zeros(n, N, N, 'float64')
  local w, unseen = fa.zeros(n, N, N, 'float64'), fa.zeros(n, N, N, 'float64')
  local pf, pm, pd = ffi.cast('double*', feat.desc.data), ffi.cast('double*', mask.desc.data), ffi.cast('double*', dist.desc.data)
  local pw, pu = ffi.cast('double*', w.desc.data), ffi.cast('double*', unseen.desc.data)
  local rnd = math.random
  local function gauss() return math.sqrt(-2 * math.log(1 - rnd())) * math.cos(2 * math.pi * rnd()) end
  local lengths = {}
  for b = 0, n - 1 do
    local L = math.floor(N / 2) + math.floor(rnd() * (N - math.floor(N / 2) + 1))
    L = math.min(L, N)
    lengths[b + 1] = L
    local x, y, z = { 0 }, { 0 }, { 0 }
    for i = 2, L do -- a unit step in a uniformly random direction
      local u, t = 2 * rnd() - 1, 2 * math.pi * rnd()
      local s = math.sqrt(1 - u * u)
      x[i], y[i], z[i] = x[i - 1] + s * math.cos(t), y[i - 1] + s * math.sin(t), z[i - 1] + u
    end
    for i = 1, L do
      for j = i, L do
        local d = math.sqrt((x[i] - x[j]) ^ 2 + (y[i] - y[j]) ^ 2 + (z[i] - z[j]) ^ 2)
        local sep = j - i
        local seen = sep == 1 or (sep > 1 and rnd() < obs)
        local dn = seen and math.max(0, d + noise * gauss()) or 0
        for _, ij in ipairs({ { i, j }, { j, i } }) do
          local e = (b * N + ij[1] - 1) * N + ij[2] - 1
          pm[e], pd[e] = 1, d
          if sep > 0 then
            pw[e] = 1
            if not seen then pu[e] = 1 end
          end
          local f = pf + e * NFEAT
          f[0], f[1], f[2] = seen and 1 or 0, dn, dn * dn / 4
          f[3], f[4], f[5] = sep / N, math.log(1 + sep), sep == 0 and 1 or 0
        end
      end
    end
  end
  return { feat = feat, mask = mask, dist = dist, w = w, unseen = unseen, n = n, N = N, lengths = lengths }
end

---------------------------------------------------------------------------- model
-- a pair block: z = z + tri_start{z, mask}; z = z + tri_end{z, mask}; z = z + transition(z)
local Block = nn.class('TrainTriangleBlock', nn.Module)

function Block:__init(o, triangle)
  nn.Module.__init(self)
  local c = o.c_z
  if triangle then
    self:registerModule('tri_start', nn.TriangleAttention{ c_in = c, c_hidden = o.c_hidden, no_heads = o.heads, starting = true })
    self:registerModule('tri_end', nn.TriangleAttention{ c_in = c, c_hidden = o.c_hidden, no_heads = o.heads, starting = false })
  end
  self:registerModule('transition', nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.ReLU(), nn.Linear(4 * c, c)))
end

local buf = common.buffer

-- input {z, mask} -> z
function Block:updateOutput(input)
  local z, mask = input[1], input[2]
  if self.tri_start then
    self._in1 = { z, mask }
    z = buf(self, '_z1', z):copy(z):add_(self.tri_start:forward(self._in1))
    self._in2 = { z, mask }
    z = buf(self, '_z2', z):copy(z):add_(self.tri_end:forward(self._in2))
  end
  self._in3 = z
  self.output = buf(self, '_z3', z):copy(z):add_(self.transition:forward(z))
  return self.output
end

-- the gradient of z (the mask gets none); adds the parameter gradients
function Block:backward(input, g)
  local gz = buf(self, '_g3', g):copy(g):add_(self.transition:backward(self._in3, g))
  if self.tri_start then
    local g2 = buf(self, '_g2', g):copy(gz):add_(self.tri_end:backward(self._in2, gz)[1])
    gz = buf(self, '_g1', g):copy(g2):add_(self.tri_start:backward(self._in1, g2)[1])
  end
  self.gradInput = gz
  return gz
end

local Net = nn.class('TrainTriangleNet', nn.Module)

function Net:__init(o, triangle)
  nn.Module.__init(self)
  self:registerModule('embed', nn.Linear(NFEAT, o.c_z))
  local blocks = {}
  for i = 1, o.blocks do blocks[i] = Block(o, triangle) end
  self:registerModule('blocks', nn.ModuleList(blocks))
  self:registerModule('head', nn.Sequential(nn.LayerNorm(o.c_z), nn.Linear(o.c_z, 1)))
end

-- input {feat (n, N, N, NFEAT), mask (n, N, N)} -> distances (n, N, N, 1)
function Net:updateOutput(input)
  local feat, mask = input[1], input[2]
  local z = self.embed:forward(feat)
  self._blockIn = {}
  for i = 1, self.blocks:size() do
    self._blockIn[i] = { z, mask }
    z = self.blocks:get(i):forward(self._blockIn[i])
  end
  self._top = z
  self.output = self.head:forward(z)
  return self.output
end

function Net:backward(input, g)
  g = self.head:backward(self._top, g)
  for i = self.blocks:size(), 1, -1 do g = self.blocks:get(i):backward(self._blockIn[i], g) end
  self.embed:backward(input[1], g)
  self.gradInput = nil
end

-- the triangle model (triangle ~= false) or the baseline (triangle = false)
function M.makeModel(o, triangle) return Net(common.withDefaults(M.defaults, o), triangle ~= false) end

---------------------------------------------------------------------------- loss
-- weighted mean squared error over the real pairs: sum w (pred - d)^2 / sum w; its gradient into g
local function mse(pred, batch, g)
  local p = pred:view(batch.n, batch.N, batch.N)
  local diff = g:view(batch.n, batch.N, batch.N):copy(p):sub_(batch.dist):mul_(batch.w)
  local sw = batch.w:sum()
  local loss = (diff * diff):sum() / sw
  diff:scale_(2 / sw)
  return loss
end

---------------------------------------------------------------------------- train / evaluate
local function onDevice(o, b)
  for _, k in ipairs({ 'feat', 'mask', 'dist', 'w', 'unseen' }) do b[k] = b[k]:to('float32', o.device) end
  return b
end

local function batchFor(o, n) return onDevice(o, M.makeBatch(n, o.n, o.obs, o.noise)) end

-- trains `model` for o.steps steps (o: the options of M.defaults; common.train: AdamW, cosine schedule, clipping,
-- progress lines starting with `label`); returns the per-step losses and the seconds it took
function M.train(model, o, label)
  local gbuf
  return common.train(model, o, {
    label = label, unit = 'chains',
    batch = function(n)
      local b = batchFor(o, n)
      return { b.feat, b.mask }, b
    end,
    loss = function(pred, b)
      gbuf = nn._buffer(gbuf, pred:size(), pred)
      return mse(pred, b, gbuf), gbuf
    end,
  })
end

-- on n fresh chains: RMSE of the distances of the unseen pairs and of all real pairs, and the mean loss
function M.evaluate(model, o, n)
  local su, nu, sa, na, lsum, batches = 0, 0, 0, 0, 0, 0
  local g
  common.heldOut(model, n, math.min(n, 50), function(m)
    local b = batchFor(o, m)
    local pred = model:forward({ b.feat, b.mask })
    g = nn._buffer(g, pred:size(), pred)
    lsum, batches = lsum + mse(pred, b, g), batches + 1
    local e = pred:view(m, o.n, o.n) - b.dist
    e = e * e
    su, nu = su + (e * b.unseen):sum(), nu + b.unseen:sum()
    sa, na = sa + (e * b.w):sum(), na + b.w:sum()
  end)
  return { rmse_unseen = math.sqrt(su / math.max(nu, 1)), rmse_all = math.sqrt(sa / math.max(na, 1)),
           loss = lsum / batches }
end

---------------------------------------------------------------------------- main
-- args (a list of strings) -> the options, or nil and the message
function M.parseArgs(args) return fa.util.parseArgs(M.cli, args) end

function M.main(args)
  local o = fa.util.cli(M.cli, args)
  local function run(triangle, label)
    common.seed(o.seed)
    local model = M.makeModel(o, triangle)
    local nparams = model:getParameters():numel()
    print(string.format('%s: %d parameters', label, nparams))
    local losses, dt = M.train(model, o, triangle and '' or 'baseline ')
    math.randomseed(o.seed + 1000) -- held-out chains: other draws, the same for both models
    local r = M.evaluate(model, o, o.test)
    r.time = dt
    return r, losses
  end
  print(string.format('fastattn %s: pair model with triangle attention (%d blocks, c_z %d, %d heads x %d), %s, %d threads',
                      fa.version, o.blocks, o.c_z, o.heads, o.c_hidden, o.device, fa.getNumThreads()))
  print(string.format('task: the %dx%d distance matrix of random 3-D chains of %d..%d unit steps from %.0f%% of the ' ..
                      'distances (noise %.2f) and the chain separations', o.n, o.n, math.floor(o.n / 2), o.n,
                      100 * o.obs, o.noise))
  local r, losses = run(true, 'triangle model')
  print(string.format('trained %d steps of %d chains in %.1f s', o.steps, o.batch, r.time))
  local line = 'held-out (%d chains) %-15s RMSE of the unseen distances %.3f, of all distances %.3f, loss %.4f'
  print(string.format(line, o.test, 'triangle model:', r.rmse_unseen, r.rmse_all, r.loss))
  local base
  if not o.no_baseline then
    base = run(false, 'baseline (no triangle blocks)')
    print(string.format('trained the baseline in %.1f s', base.time))
    print(string.format(line, o.test, 'triangle model:', r.rmse_unseen, r.rmse_all, r.loss))
    print(string.format(line, o.test, 'baseline:', base.rmse_unseen, base.rmse_all, base.loss))
    print(string.format('triangle attention: %.0f%% lower RMSE on the unseen distances', 100 * (1 - r.rmse_unseen / base.rmse_unseen)))
  end
  common.plot(o.plot, losses, string.format('train_triangle: loss per step (%d steps, batch %d, n %d)', o.steps, o.batch,
                                            o.n))
  return r, base, losses
end

-- run as a script (bin/fastattn examples/train_triangle.lua ...), or return the parts to dofile()
return common.script(M, 'train_triangle.lua')
