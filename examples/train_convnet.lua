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
local common = require 'examples.common' -- the plumbing every example shares: option rows, training loop, plot
local opt = common.opt

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

---------------------------------------------------------------------------- train / evaluate
-- fraction of correctly classified images of (x, y), in batches, in evaluate mode
function M.accuracy(model, x, y, device)
  local n, correct = x:size(1), 0
  common.heldOut(model, n, 250, function(m, i)
    local xb = x:narrow(1, i, m)
    if device == 'cuda' then xb = xb:cuda() end
    local pred = model:forward(xb):argmax(2):view(-1):cpu():table()
    local yt = y:narrow(1, i, m):table()
    for k = 1, m do if pred[k] == yt[k] then correct = correct + 1 end end
  end)
  return correct / n
end

-- trains model for opts.steps steps (common.train: AdamW, cosine schedule, clipping); returns the per-step
-- losses and the seconds it took. opts: steps, batch, lr, device, every (print period; 0 = silent),
-- weightDecay, clip
function M.train(model, opts)
  local crit = nn.CrossEntropyCriterion()
  if opts.device == 'cuda' then crit:cuda() end
  return common.train(model, opts, {
    eta_min = 0.01, weightDecay = opts.weightDecay,
    batch = function(n)
      local x, y = M.makeBatch(n)
      if opts.device == 'cuda' then x, y = x:cuda(), y:cuda() end
      return x, y
    end,
    loss = function(out, y)
      local loss = crit:forward(out, y)
      return loss, crit:backward(out, y)
    end,
    -- this example's progress line shows the step's own loss
    line = function(step, steps, _, last, lr, rate)
      return string.format('step %4d/%d  loss %.4f  lr %.2e  %7.0f img/s', step, steps, last, lr, rate)
    end,
  })
end

-- the command line (fa.util.parseArgs): options, defaults, ranges, help
M.cli = {
  prog = 'train_convnet.lua',
  usage = 'bin/fastattn examples/train_convnet.lua [options]',
  about = 'trains a small conv net (3 convs, 2 linear layers) to tell four shapes apart in synthetic noisy\n' ..
          '16x16 images: horizontal bar, vertical bar, diagonal, hollow square.',
  footer = '`make demo-convnet` runs it with the defaults.',
  options = {
    opt.steps(300), opt.batch(64), opt.lr(3e-3), opt.device(), opt.seed(), opt.threads(),
    { 'test', 'int', 1000, min = 1, help = 'held-out images for the accuracy' },
    opt.every(25), opt.clip(), opt.plot('convnet_loss.svg'),
  },
}
M.defaults = fa.util.defaults(M.cli)

-- args (a list of strings) -> the options, or nil and the message
function M.parseArgs(args) return fa.util.parseArgs(M.cli, args) end

-- runs the example with the command line args; --help and bad options end the script here (fa.util.cli)
function M.main(args)
  local o = fa.util.cli(M.cli, args)
  common.seed(o.seed)
  local model = M.makeModel()
  local nparams = model:getParameters():numel()
  print(string.format('fastattn %s: conv net, %d parameters, %d classes (%s), %s, %d threads', fa.version, nparams,
                      CLASSES, table.concat(CLASS_NAMES, ', '), o.device, fa.getNumThreads()))
  local losses, train_time = M.train(model, o)
  math.randomseed(o.seed + 1000) -- a held-out set: other draws
  local tx, ty = M.makeBatch(o.test)
  local acc = M.accuracy(model, tx, ty, o.device)
  print(string.format('trained %d steps of %d images in %.1f s; test accuracy %.1f%% on %d held-out images',
                      o.steps, o.batch, train_time, 100 * acc, o.test))
  common.plot(o.plot, losses, string.format('train_convnet: loss per step (%d steps, batch %d)', o.steps, o.batch))
  return acc, losses
end

-- run as a script (bin/fastattn examples/train_convnet.lua ...), or return the parts to dofile()
return common.script(M, 'train_convnet.lua')
