-- criterion.lua: nn.Criterion, nn.MSECriterion, nn.CrossEntropyCriterion (Torch7's criterion API):
--   loss = crit:forward(input, target)       a number (reduction 'mean'/'sum'), a tensor for 'none'
--   gradInput = crit:backward(input, target) dloss/dinput; for reduction 'none' pass the gradient of the
--                                            per-element losses as a third argument (default: ones)
-- Class targets are int64 tensors of 1-based class indices (Torch7's convention, and what Tensor:argmax
-- returns); rows whose target equals ignore_index count for nothing.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local Criterion = nn.class('Criterion', nn.Module)

function Criterion:__init()
  nn.Module.__init(self)
end
function Criterion:forward(input, target) return self:updateOutput(input, target) end
function Criterion:backward(input, target, gradOutput) return self:updateGradInput(input, target, gradOutput) end

-- a kept tensor holding the gradient of the loss: ones (0-D for mean/sum, `shape` for none)
function Criterion:_gradLoss(like, shape, gradOutput)
  if gradOutput ~= nil then
    if type(gradOutput) == 'number' then
      self._g = nn._buffer(self._g, {}, like)
      return self._g:fill(gradOutput)
    end
    return gradOutput
  end
  local g = self._ones
  local same = g ~= nil and g.desc.dtype == like.desc.dtype and g.desc.device == like.desc.device and g:dim() == #shape
  for i = 1, #shape do same = same and g:size(i) == shape[i] end
  if not same then
    g = fa.ones(shape, { dtype = like.desc.dtype, device = like.desc.device })
    self._ones = g
  end
  return g
end

local REDNAME = { [0] = 'none', 'mean', 'sum' }

---------------------------------------------------------------------------- nn.MSECriterion
-- nn.MSECriterion(reduction = 'mean') (or Torch7's sizeAverage boolean: true = mean, false = sum)
local MSECriterion = nn.class('MSECriterion', Criterion)

function MSECriterion:__init(reduction)
  Criterion.__init(self)
  if type(reduction) == 'table' then reduction = reduction.reduction end
  self._red = F._reduction_id('nn.MSECriterion', reduction)
  self.reduction = REDNAME[self._red]
end
function MSECriterion:__tostring__() return 'nn.MSECriterion(' .. self.reduction .. ')' end

function MSECriterion:_check(input, target)
  local ok, err = pcall(F._check_mse, tostring(self), input, target)
  if not ok then error(nn._strip_position(err), 0) end
end

function MSECriterion:updateOutput(input, target)
  self:_check(input, target)
  self._loss = nn._buffer(self._loss, self._red == 0 and input:size() or {}, input)
  F.mse_loss_forward(self._loss, input, target, self._red)
  self.output = self._red == 0 and self._loss or self._loss:item()
  return self.output
end

function MSECriterion:updateGradInput(input, target, gradOutput)
  self:_check(input, target)
  local g = self:_gradLoss(input, self._red == 0 and input:size() or {}, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  return F.mse_loss_backward(self.gradInput, g, input, target, self._red)
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
  opts = opts or {}
  self.ignore_index, self.label_smoothing, self._red = F._cross_entropy_opts('nn.CrossEntropyCriterion', opts)
  self.reduction = REDNAME[self._red]
end

function CrossEntropyCriterion:__tostring__()
  local s = 'nn.CrossEntropyCriterion(' .. self.reduction
  if self.label_smoothing ~= 0 then s = s .. ', label_smoothing ' .. self.label_smoothing end
  if self.ignore_index ~= -100 then s = s .. ', ignore_index ' .. self.ignore_index end
  return s .. ')'
end

function CrossEntropyCriterion:_prepare(input, target)
  local ok, shape = pcall(F._check_cross_entropy, tostring(self), input, target)
  if not ok then error(nn._strip_position(shape), 0) end
  -- the C API takes 0-based targets; keep the shifted copy for backward
  self._target0 = F._targets0(target, self._target0)
  return shape
end

function CrossEntropyCriterion:updateOutput(input, target)
  local shape = self:_prepare(input, target)
  self._loss = nn._buffer(self._loss, self._red == 0 and shape or {}, input)
  F.cross_entropy_forward(self._loss, input, self._target0, self.ignore_index, self.label_smoothing, self._red)
  self.output = self._red == 0 and self._loss or self._loss:item()
  return self.output
end

function CrossEntropyCriterion:updateGradInput(input, target, gradOutput)
  local shape = self:_prepare(input, target)
  local g = self:_gradLoss(input, self._red == 0 and shape or {}, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  return F.cross_entropy_backward(self.gradInput, g, input, self._target0, self.ignore_index, self.label_smoothing,
                                  self._red)
end

return Criterion
