-- dropout.lua: nn.Dropout(p = 0.5): in training, zeroes each element with probability p and scales the
-- rest by 1/(1-p) (the mask comes from fa's RNG stream: fa.manualSeed makes it reproducible); in
-- evaluate() mode, and for p = 0, the identity (output is the input tensor itself).
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local E = require 'fastattn.errors'
local op = F._impl

local Dropout = nn.class('Dropout', nn.Module)

function Dropout:__init(p)
  nn.Module.__init(self)
  if type(p) == 'table' then p = E.opts('fa.nn.Dropout', 'opts', p, { p = true }).p end
  if p == nil then p = 0.5 end
  self.p = F._check_p('fa.nn.Dropout', p)
end

function Dropout:__tostring__() return string.format('nn.Dropout(%g)', self.p) end

function Dropout:_active() return self.train and self.p > 0 end

function Dropout:updateOutput(input)
  local fn = self.__fnForward
  E.tensor(fn, 'input', input)
  if not self:_active() then
    self.output = input
    return input
  end
  -- own buffers, kept apart from self.output, which may be the caller's input after an evaluate() pass
  self._output = nn._buffer(self._output, input:size(), input)
  self.mask = nn._buffer(self.mask, input:size(), fa.dtypes.bool, input.desc.device)
  op.dropout(fn, input, self.p, true, { out = self._output, mask = self.mask })
  self.output = self._output
  return self.output
end

function Dropout:updateGradInput(input, gradOutput)
  local fn = self.__fnUpdateGradInput
  E.tensor(fn, 'input', input)
  nn._checkGradOutput(fn, gradOutput, input, input:size())
  if not self:_active() then
    self.gradInput = gradOutput
    return gradOutput
  end
  if self.mask == nil then E.fail(fn, 'no mask: call forward (in training mode) before backward') end
  self._gradInput = nn._buffer(self._gradInput, input:size(), input)
  op.dropout_backward(fn, gradOutput, self.mask, self.p, { grad_input = self._gradInput })
  self.gradInput = self._gradInput
  return self.gradInput
end

return Dropout
