-- train_convnet.lua: trains a small conv net on synthetic 16x16 images of four shapes (horizontal bar,
-- vertical bar, diagonal, hollow square; random position and size, Gaussian noise), with AdamW, a cosine
-- learning-rate schedule with warm-up and gradient clipping, then reports the accuracy on a held-out set.
--
--   make demo-convnet                             (builds the library, then runs this with its defaults)
--   bin/fastattn examples/train_convnet.lua --help  (the options and their defaults)
--
-- Prints a progress line every --every steps, the held-out accuracy, and writes the loss curve as an SVG
-- file (--plot). Bad options are refused before training. Loaded with dofile() (as spec/train_spec.lua
-- does) it runs nothing and returns its parts: {cli, defaults, makeBatch, makeModel, train, accuracy,
-- parseArgs, main}.
local ffi = require 'ffi'
local fa = require 'fastattn'
local nn = fa.nn

local M = {}
local SIZE, CLASSES = 16, 4
local CLASS_NAMES = { 'horizontal bar', 'vertical bar', 'diagonal', 'square' }

---------------------------------------------------------------------------- data
-- a batch of n images (n, 1, SIZE, SIZE) and their 1-based classes (n, int64), drawn with Lua's RNG
-- (math.randomseed decides them) and fa's for the noise (fa.manualSeed decides it)
function M.makeBatch(n, noise)
  noise = noise or 0.3
  local x = fa.randn(n, 1, SIZE, SIZE):scale_(noise)
  local y = fa.empty(n, 'int64')
  local px = ffi.cast('float*', x.desc.data)
  local py = ffi.cast('int64_t*', y.desc.data)
  local rnd = math.random
  for i = 0, n - 1 do
    local img = px + i * SIZE * SIZE
    local function dot(r, c) -- 0-based row, col; ignores points outside the image
      if r >= 0 and r < SIZE and c >= 0 and c < SIZE then img[r * SIZE + c] = img[r * SIZE + c] + 1 end
    end
    local cls = rnd(CLASSES)
    py[i] = cls
    local len = rnd(6, 11)
    if cls == 1 or cls == 2 then       -- a bar, 1 or 2 pixels thick
      local a, b, thick = rnd(0, SIZE - 2), rnd(0, SIZE - len), rnd(1, 2)
      for t = 0, thick - 1 do
        for k = 0, len - 1 do
          if cls == 1 then dot(a + t, b + k) else dot(b + k, a + t) end
        end
      end
    elseif cls == 3 then               -- a diagonal, either direction
      local r0, c0 = rnd(0, SIZE - len), rnd(0, SIZE - len)
      local anti = rnd(2) == 1
      for k = 0, len - 1 do
        if anti then dot(r0 + k, c0 + len - 1 - k) else dot(r0 + k, c0 + k) end
      end
    else                               -- a hollow square
      local s = rnd(5, 9)
      local r0, c0 = rnd(0, SIZE - s), rnd(0, SIZE - s)
      for k = 0, s - 1 do
        dot(r0, c0 + k); dot(r0 + s - 1, c0 + k)
        if k > 0 and k < s - 1 then dot(r0 + k, c0); dot(r0 + k, c0 + s - 1) end
      end
    end
  end
  return x, y
end

---------------------------------------------------------------------------- model
function M.makeModel()
  return nn.Sequential()
    :add(nn.Conv2d(1, 16, 3, 1, 1)):add(nn.ReLU())        -- 16x16
    :add(nn.Conv2d(16, 32, 3, 2, 1)):add(nn.ReLU())       -- 8x8
    :add(nn.Conv2d(32, 32, 3, 2, 1)):add(nn.ReLU())       -- 4x4
    :add(nn.Flatten())
    :add(nn.Linear(32 * 4 * 4, 64)):add(nn.ReLU())
    :add(nn.Dropout(0.1))
    :add(nn.Linear(64, CLASSES))
end

---------------------------------------------------------------------------- helpers
local now = fa.clock

-- fraction of correctly classified images of (x, y), in batches, in evaluate mode
function M.accuracy(model, x, y, device)
  model:evaluate()
  local n, correct, bs = x:size(1), 0, 250
  for i = 1, n, bs do
    local m = math.min(bs, n - i + 1)
    local xb = x:narrow(1, i, m)
    if device == 'cuda' then xb = xb:cuda() end
    local pred = model:forward(xb):argmax(2):view(-1):cpu():table()
    local yt = y:narrow(1, i, m):table()
    for k = 1, m do if pred[k] == yt[k] then correct = correct + 1 end end
  end
  model:training()
  return correct / n
end

-- trains model for opts.steps steps; returns the per-step losses. opts: steps, batch, lr, device,
-- every (print period; 0 = silent), weightDecay, clip
function M.train(model, opts)
  local device = opts.device or 'cpu'
  local crit = nn.CrossEntropyCriterion()
  if device == 'cuda' then model:cuda(); crit:cuda() end
  local params, grads = model:getParameters()
  local sched = fa.optim.CosineLR{ lr = opts.lr, T_max = opts.steps, warmup = math.max(1, math.floor(opts.steps / 20)),
                                   eta_min = opts.lr * 0.01 }
  local config = { learningRate = opts.lr, weightDecay = opts.weightDecay or 1e-4 }
  local state = {}
  local losses = {}
  local t0, seen = now(), 0
  for step = 1, opts.steps do
    local x, y = M.makeBatch(opts.batch)
    if device == 'cuda' then x, y = x:cuda(), y:cuda() end
    config.learningRate = sched:get(step - 1)
    local function feval()
      grads:zero()
      local out = model:forward(x)
      local loss = crit:forward(out, y)
      model:backward(x, crit:backward(out, y))
      if opts.clip and opts.clip > 0 then fa.optim.clipGradNorm(grads, opts.clip) end
      return loss, grads
    end
    local _, fx = fa.optim.adamw(feval, params, config, state)
    losses[step] = fx[1]
    seen = seen + opts.batch
    if opts.every and opts.every > 0 and (step % opts.every == 0 or step == opts.steps) then
      local dt = now() - t0
      print(string.format('step %4d/%d  loss %.4f  lr %.2e  %7.0f img/s', step, opts.steps, fx[1],
                          config.learningRate, seen / dt))
      t0, seen = now(), 0
    end
  end
  return losses
end

-- the command line (fa.util.parseArgs): options, defaults, ranges, help
M.cli = {
  prog = 'train_convnet.lua',
  usage = 'bin/fastattn examples/train_convnet.lua [options]',
  about = 'trains a small conv net (3 convs, 2 linear layers) to tell four shapes apart in synthetic noisy\n' ..
          '16x16 images: horizontal bar, vertical bar, diagonal, hollow square.',
  footer = '`make demo-convnet` runs it with the defaults.',
  options = {
    { 'steps', 'int', 300, min = 1, help = 'training steps' },
    { 'batch', 'int', 64, min = 1, help = 'images per step' },
    { 'lr', 'number', 3e-3, positive = true, help = 'peak learning rate (AdamW, cosine schedule)' },
    { 'device', 'choice', 'cpu', choices = { 'cpu', 'cuda' }, help = 'where to train' },
    { 'seed', 'int', 1, min = 0, help = 'random seed (images and weights)' },
    { 'threads', 'int', nil, min = 1, default_text = 'all cores', help = 'CPU threads' },
    { 'test', 'int', 1000, min = 1, help = 'held-out images for the accuracy' },
    { 'every', 'int', 25, min = 0, help = 'print progress every N steps (0: never)' },
    { 'clip', 'number', 1.0, min = 0, help = 'gradient-norm clipping (0: off)' },
    -- into build/ (ignored by git) when run from the repository, else the current directory
    { 'plot', 'path', os.rename('build', 'build') and 'build/convnet_loss.svg' or 'convnet_loss.svg', none = true,
      help = "SVG file for the loss curve ('none': no plot)" },
  },
}
M.defaults = fa.util.defaults(M.cli)

-- args (a list of strings) -> the options, or nil and the message
function M.parseArgs(args) return fa.util.parseArgs(M.cli, args) end

-- runs the example with the command line args; --help and bad options end the script here (fa.util.cli)
function M.main(args)
  local o = fa.util.cli(M.cli, args)
  math.randomseed(o.seed)
  fa.manualSeed(o.seed)
  local model = M.makeModel()
  local nparams = model:getParameters():numel()
  print(string.format('fastattn %s: conv net, %d parameters, %d classes (%s), %s, %d threads', fa.version, nparams,
                      CLASSES, table.concat(CLASS_NAMES, ', '), o.device, fa.getNumThreads()))
  local t0 = now()
  local losses = M.train(model, o)
  local train_time = now() - t0
  math.randomseed(o.seed + 1000) -- a held-out set: other draws
  local tx, ty = M.makeBatch(o.test)
  local acc = M.accuracy(model, tx, ty, o.device)
  print(string.format('trained %d steps of %d images in %.1f s; test accuracy %.1f%% on %d held-out images',
                      o.steps, o.batch, train_time, 100 * acc, o.test))
  if o.plot then
    fa.util.writePlot(o.plot, losses, string.format('train_convnet: loss per step (%d steps, batch %d)', o.steps, o.batch))
    print('loss curve written to ' .. o.plot)
  end
  return acc, losses
end

-- run as a script (bin/fastattn examples/train_convnet.lua ...), or return the parts to dofile()
local script = arg and arg[0] and arg[0]:match('train_convnet%.lua$')
if script and not _G.__FASTATTN_NO_MAIN then
  M.main(arg)
end
return M
