-- criterion.lua: nn.Criterion, nn.MSECriterion, nn.CrossEntropyCriterion (Torch7's criterion API):
--   loss = crit:forward(input, target)       a number (reduction 'mean'/'sum'), a tensor for 'none'
--   gradInput = crit:backward(input, target) dloss/dinput; for reduction 'none' pass the gradient of the
--                                            per-element losses as a third argument (default: ones)
-- Class targets are int64 tensors of 1-based class indices (Torch7's convention, and what Tensor:argmax
-- returns); rows whose target equals ignore_index count for nothing.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local E = require 'fastattn.errors'
local op = F._impl

local Criterion = nn.class('Criterion', nn.Module)

function Criterion:__init()
  nn.Module.__init(self)
end
function Criterion:forward(input, target) return self:updateOutput(input, target) end
function Criterion:backward(input, target, gradOutput)
  return nn._as(self, self.__fnBackward, self.updateGradInput, input, target, gradOutput)
end

-- a kept tensor holding the gradient of the loss: gradOutput (a tensor or a number), or ones (0-D for
-- mean/sum, `shape` for none)
function Criterion:_gradLoss(fn, like, shape, gradOutput)
  if gradOutput ~= nil then
    if fa.isTensor(gradOutput) then
      -- the loss's size: reduced losses take any one-element tensor
      if #shape > 0 or gradOutput:numel() ~= 1 then
        nn._checkGradOutput(fn, gradOutput, like, shape, #shape > 0 and "the loss's, reduction 'none'"
                            or "one element: the loss is reduced")
      end
      return gradOutput
    end
    E.number(fn, 'gradOutput', gradOutput)
    if #shape > 0 then
      E.argv(fn, 'gradOutput', 'a tensor of size ' .. table.concat(shape, 'x') .. " (reduction 'none')", gradOutput)
    end
    self._g = nn._buffer(self._g, {}, like)
    return self._g:fill(gradOutput)
  end
  local g = self._ones
  if not (g ~= nil and g.desc.dtype == like.desc.dtype and g.desc.device == like.desc.device and nn._hasSize(g, shape)) then
    g = fa.ones(shape, { dtype = like.desc.dtype, device = like.desc.device })
    self._ones = g
  end
  return g
end

local REDNAME = F._reduction_name
local NONE = fa.C.FA_REDUCE_NONE

---------------------------------------------------------------------------- nn.MSECriterion
-- nn.MSECriterion(reduction = 'mean') (or Torch7's sizeAverage boolean: true = mean, false = sum)
local MSECriterion = nn.class('MSECriterion', Criterion)

function MSECriterion:__init(reduction)
  Criterion.__init(self)
  if type(reduction) == 'table' then
    reduction = E.opts('fa.nn.MSECriterion', 'opts', reduction, { reduction = true }).reduction
  end
  self._red = F._reduction_id('fa.nn.MSECriterion', reduction)
  self.reduction = REDNAME[self._red]
end
function MSECriterion:__tostring__() return 'nn.MSECriterion(' .. self.reduction .. ')' end

function MSECriterion:updateOutput(input, target)
  local fn = self.__fnForward
  E.tensor(fn, 'input', input)
  self._loss = nn._buffer(self._loss, self._red == NONE and input:size() or {}, input)
  op.mse_loss(fn, input, target, { reduction = self.reduction, out = self._loss })
  self.output = self._red == NONE and self._loss or self._loss:item()
  return self.output
end

function MSECriterion:updateGradInput(input, target, gradOutput)
  local fn = self.__fnUpdateGradInput
  E.tensor(fn, 'input', input)
  local g = self:_gradLoss(fn, input, self._red == NONE and input:size() or {}, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  return op.mse_loss_backward(fn, g, input, target, { reduction = self.reduction, grad_input = self.gradInput })
end

---------------------------------------------------------------------------- nn.CrossEntropyCriterion
-- nn.CrossEntropyCriterion{ignore_index = -100, label_smoothing = 0, reduction = 'mean'}: log-softmax over
-- dim 2 of the logits (N, C) or (N, C, d1, ...) and the negative log-likelihood of the targets (int64,
-- 1-based, of size (N) or (N, d1, ...)), with PyTorch's label smoothing; 'mean' divides by the number of
-- targets that are not ignore_index.
local CrossEntropyCriterion = nn.class('CrossEntropyCriterion', Criterion)

function CrossEntropyCriterion:__init(opts)
  Criterion.__init(self)
  if type(opts) == 'string' then opts = { reduction = opts } end
  self.ignore_index, self.label_smoothing, self._red = F._cross_entropy_opts('fa.nn.CrossEntropyCriterion', opts)
  self.reduction = REDNAME[self._red]
  self._opts = { ignore_index = self.ignore_index, label_smoothing = self.label_smoothing, reduction = self.reduction }
end

function CrossEntropyCriterion:__tostring__()
  local s = 'nn.CrossEntropyCriterion(' .. self.reduction
  if self.label_smoothing ~= 0 then s = s .. ', label_smoothing ' .. self.label_smoothing end
  if self.ignore_index ~= -100 then s = s .. ', ignore_index ' .. self.ignore_index end
  return s .. ')'
end

-- the loss shape for `input` (as the C entry will check it)
local function loss_shape(red, input)
  if red ~= NONE then return {} end
  local s = input:size()
  table.remove(s, 2)
  return s
end

function CrossEntropyCriterion:updateOutput(input, target)
  local fn = self.__fnForward
  E.tensor(fn, 'input', input)
  self._loss = nn._buffer(self._loss, loss_shape(self._red, input), input)
  local o = self._opts
  o.out, o.grad_input = self._loss, nil
  -- the C API takes 0-based targets; op keeps the shifted copy in self._target0
  local _, t0 = op.cross_entropy(fn, input, target, o, self._target0)
  self._target0 = t0
  self.output = self._red == NONE and self._loss or self._loss:item()
  return self.output
end

function CrossEntropyCriterion:updateGradInput(input, target, gradOutput)
  local fn = self.__fnUpdateGradInput
  E.tensor(fn, 'input', input)
  local g = self:_gradLoss(fn, input, loss_shape(self._red, input), gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  local o = self._opts
  o.out, o.grad_input = nil, self.gradInput
  local gi, t0 = op.cross_entropy_backward(fn, g, input, target, o, self._target0)
  self._target0 = t0
  return gi
end

return Criterion
