-- examples/common.lua: the plumbing the training examples share (examples/train_*.lua), so that each of them
-- shows only its task and its model. bin/fastattn puts the repository on the path:
--
--   local common = require 'examples.common'
--   common.opt.steps(600), common.opt.batch(24), ...   the option rows every example has (fa.util's cli rows)
--   common.outPath('x.svg')                            build/x.svg in the repository, else x.svg
--   opts = common.withDefaults(defaults, o)            a copy of defaults with o's keys on top
--   buf = common.buffer(module, key, like)             module[key]: a buffer the size of `like`, kept between calls
--   losses, seconds = common.train(model, o, task)     the training loop (below)
--   common.heldOut(model, n, bs, fn)                   fn(m, start) per batch of m <= bs of n samples, in evaluate mode
--   common.seed(s)                                     seeds Lua's RNG (the data) and fa's (weights, noise)
--   common.plot(path, losses, title)                   writes the loss curve and says where (path false: nothing)
--   common.evalForward(model, x)                       a forward in evaluate mode (for a picture or a metric)
--   common.COLOURS, common.xml(s), common.range(rows)  the pictures' palette, text escaped for SVG, min and max
--   common.writeSvg(path, lines)                       the SVG lines and '</svg>' written to path
--   return common.script(M, 'train_x.lua')             runs M.main(arg) when run as that script; returns M
local fa = require 'fastattn'
local nn = fa.nn

local C = {}

---------------------------------------------------------------------------- options
-- an output file's default path: in build/ (ignored by git) when run from the repository, else here
function C.outPath(name) return os.rename('build', 'build') and 'build/' .. name or name end

C.opt = {}
function C.opt.steps(n, help) return { 'steps', 'int', n, min = 1, help = help or 'training steps' } end
-- what: the samples ('images', the default; 'chains')
function C.opt.batch(n, what) return { 'batch', 'int', n, min = 1, help = (what or 'images') .. ' per step' } end
function C.opt.lr(x) return { 'lr', 'number', x, positive = true, help = 'peak learning rate (AdamW, cosine schedule)' } end
function C.opt.device() return { 'device', 'choice', 'cpu', choices = { 'cpu', 'cuda' }, help = 'where to train' } end
function C.opt.seed(what)
  return { 'seed', 'int', 1, min = 0, help = 'random seed (' .. (what or 'images') .. ' and weights)' }
end
function C.opt.threads() return { 'threads', 'int', nil, min = 1, default_text = 'all cores', help = 'CPU threads' } end
function C.opt.every(n) return { 'every', 'int', n, min = 0, help = 'print progress every N steps (0: never)' } end
function C.opt.clip() return { 'clip', 'number', 1.0, min = 0, help = 'gradient-norm clipping (0: off)' } end
function C.opt.plot(name)
  return { 'plot', 'path', C.outPath(name), none = true, help = "SVG file for the loss curve ('none': no plot)" }
end

---------------------------------------------------------------------------- model helpers
function C.withDefaults(defaults, o)
  local opts = {}
  for k, v in pairs(defaults) do opts[k] = v end
  for k, v in pairs(o or {}) do opts[k] = v end
  return opts
end

function C.buffer(self, key, like)
  self[key] = nn._buffer(self[key], like:size(), like)
  return self[key]
end

---------------------------------------------------------------------------- training
-- Trains model for o.steps steps with AdamW (weight decay task.weightDecay or 1e-4), a cosine schedule from o.lr
-- (warm-up o.steps/20, down to o.lr * (task.eta_min or 0.02)) and gradient-norm clipping at o.clip (0: off); moves
-- the model to the GPU for o.device 'cuda'. Each step draws input, target = task.batch(o.batch) and calls
-- loss, gradOutput = task.loss(output, target). Every o.every steps (0 or nil: never) prints
-- "<task.label>step S/N  loss (mean since the last line)  lr  <task.unit or 'img'>/s", or task.line(step, steps,
-- mean loss, last loss, lr, samples/s) when given. Returns the per-step losses and the seconds it took.
function C.train(model, o, task)
  local start = fa.clock()
  if o.device == 'cuda' then model:cuda() end
  local params, grads = model:getParameters()
  local sched = fa.optim.CosineLR{ lr = o.lr, T_max = o.steps, warmup = math.max(1, math.floor(o.steps / 20)),
                                   eta_min = o.lr * (task.eta_min or 0.02) }
  local config, state = { learningRate = o.lr, weightDecay = task.weightDecay or 1e-4 }, {}
  local losses = {}
  local t0, seen, acc = fa.clock(), 0, 0
  for step = 1, o.steps do
    local input, target = task.batch(o.batch)
    config.learningRate = sched:get(step - 1)
    local function feval()
      grads:zero()
      local out = model:forward(input)
      local l, gradOutput = task.loss(out, target)
      model:backward(input, gradOutput)
      if o.clip and o.clip > 0 then fa.optim.clipGradNorm(grads, o.clip) end
      return l, grads
    end
    local _, fx = fa.optim.adamw(feval, params, config, state)
    losses[step] = fx[1]
    seen, acc = seen + o.batch, acc + fx[1]
    if o.every and o.every > 0 and (step % o.every == 0 or step == o.steps) then
      local mean, rate = acc / ((step - 1) % o.every + 1), seen / (fa.clock() - t0)
      print(task.line and task.line(step, o.steps, mean, fx[1], config.learningRate, rate) or
            string.format('%sstep %5d/%d  loss %.4f  lr %.2e  %7.0f %s/s', task.label or '', step, o.steps, mean,
                          config.learningRate, rate, task.unit or 'img'))
      t0, seen, acc = fa.clock(), 0, 0
    end
  end
  return losses, fa.clock() - start
end

-- held-out evaluation: fn(m, start) for the batches of n samples (m <= bs each, samples start..start+m-1), the
-- model in evaluate mode (dropout off) meanwhile
function C.heldOut(model, n, bs, fn)
  model:evaluate()
  for start = 1, n, bs do fn(math.min(bs, n - start + 1), start) end
  model:training()
end

-- a forward of x in evaluate mode (dropout off), the model back in training mode: the state a picture or a
-- metric of the model reads
function C.evalForward(model, x)
  model:evaluate()
  model:forward(x)
  model:training()
end

---------------------------------------------------------------------------- pictures (SVG)
C.COLOURS = { '#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4', '#f032e6', '#bfef45' }

function C.xml(s) return (tostring(s):gsub('&', '&amp;'):gsub('<', '&lt;'):gsub('>', '&gt;')) end

-- the smallest and the largest value of a table of rows of numbers
function C.range(rows)
  local lo, hi = math.huge, -math.huge
  for r = 1, #rows do for c = 1, #rows[r] do lo, hi = math.min(lo, rows[r][c]), math.max(hi, rows[r][c]) end end
  return lo, hi
end

-- writes the lines of an SVG picture (from its <svg> line on) and the closing '</svg>' to path
function C.writeSvg(path, lines)
  lines[#lines + 1] = '</svg>'
  local f = assert(io.open(path, 'w'))
  f:write(table.concat(lines, '\n'), '\n')
  f:close()
end

---------------------------------------------------------------------------- main
function C.seed(s)
  math.randomseed(s)
  fa.manualSeed(s)
end

function C.plot(path, losses, title)
  if not path then return end
  fa.util.writePlot(path, losses, title)
  print('loss curve written to ' .. path)
end

-- run as a script (bin/fastattn examples/<name> ...): M.main(arg); loaded with dofile() (with
-- _G.__FASTATTN_NO_MAIN set, as the specs do): runs nothing. Returns M, the example's parts.
function C.script(M, name)
  local pattern = name:gsub('%p', '%%%0') .. '$'
  if arg and arg[0] and arg[0]:match(pattern) and not _G.__FASTATTN_NO_MAIN then M.main(arg) end
  return M
end

return C
