// The Tallyworks customer chat. Plain JavaScript with no dependencies: it speaks the server's
// public OpenAI-compatible API (POST /v1/chat/completions, stream: true) like any other client,
// and keeps the conversation in this tab. Model text only ever enters the page as text nodes.
'use strict';

(() => {
  const KEY_STORAGE = 'helpline.apiKey';
  /** Longest we wait on a Retry-After before retrying by ourselves. */
  const MAX_AUTO_WAIT_S = 30;

  const byId = (id) => document.getElementById(id);
  const log = byId('log');
  const composer = byId('composer');
  const input = byId('message');
  const sendBtn = byId('send');
  const stopBtn = byId('stop');
  const typing = byId('typing');
  const keyForm = byId('key-form');
  const keyInput = byId('api-key');
  const humanBtn = byId('talk-to-human');
  const handoffPanel = byId('handoff-panel');
  const newChatBtn = byId('new-chat');
  const greeting = log.firstElementChild;

  /** Completed turns, all sent with every question: [{role, content}]. */
  let history = [];
  /** The server's id of this chat's conversation (from the first answer): every turn and the
   * handoff go to the same conversation, so an agent sees it whole and a takeover stops the bot. */
  let conversationId = null;
  /** The signed customer token the company's site put on the page, if any (verified customers). */
  const customerToken = window.HELPLINE_CUSTOMER_TOKEN || document.documentElement.dataset.customerToken || '';
  /** A demo sign-in (the server's `demo_accounts`): say so on the page, never silently. */
  const demoAccount = document.documentElement.dataset.demoAccount || '';
  if (demoAccount) {
    const banner = document.getElementById('demo-banner');
    if (banner) {
      banner.textContent = `Demo: signed in as the demo account ${demoAccount}. Actions run against the demo Tallyworks backend.`;
      banner.hidden = false;
    }
  }

  /** Headers every request of this page sends: the API key and the customer token, when set. */
  function authHeaders(extra) {
    const headers = { ...extra };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    if (customerToken) headers['X-Helpline-Customer-Token'] = customerToken;
    return headers;
  }
  /** The turn being answered: {turn, controller}, or null. */
  let active = null;
  /** A turn refused for want of an API key; it is sent again once a key is entered. */
  let awaitingKey = null;

  /** An error the server reported in the stream (or a stream that broke its own format). */
  class StreamError extends Error {}

  // ---- DOM helpers: strings always become text nodes.

  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === 'class') node.className = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }

  /** Runs `change`, then keeps the log scrolled to the end if the reader was already there. */
  function keepingScroll(change) {
    const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    change();
    if (atEnd) log.scrollTop = log.scrollHeight;
  }

  // ---- messages

  function addUserMessage(text) {
    keepingScroll(() =>
      log.append(h('div', { class: 'msg user', 'data-testid': 'user-message' }, h('span', { class: 'who' }, 'You'), h('p', { class: 'text' }, text))),
    );
  }

  function addAssistantMessage() {
    const text = h('p', { class: 'text' });
    const node = h('div', { class: 'msg assistant', 'data-testid': 'assistant-message' }, h('span', { class: 'who' }, 'Tallyworks assistant'), text);
    keepingScroll(() => log.append(node));
    return { node, text };
  }

  /** Back to an empty, streaming answer (a retry reuses the same message). */
  function resetAnswer(bot) {
    bot.text.textContent = '';
    while (bot.text.nextSibling) bot.text.nextSibling.remove();
    bot.node.classList.remove('refusal');
    bot.node.dataset.state = 'streaming';
    // Screen readers wait for aria-busy to clear instead of reading every token.
    bot.node.setAttribute('aria-busy', 'true');
  }

  function settle(bot, state) {
    bot.node.dataset.state = state;
    bot.node.removeAttribute('aria-busy');
  }

  function note(bot, text, testid) {
    const p = h('p', { class: 'note' }, text);
    if (testid) p.dataset.testid = testid;
    keepingScroll(() => bot.node.append(p));
  }

  // ---- citations

  /** Only http(s) or same-origin paths become links; anything else (javascript: …) does not. */
  function safeHref(url) {
    if (typeof url !== 'string' || url === '') return null;
    try {
      const parsed = new URL(url, location.href);
      return parsed.protocol === 'http:' || parsed.protocol === 'https:' ? url : null;
    } catch {
      return null;
    }
  }

  function citationLabel(c) {
    const title = String(c.title || c.doc_id || 'Source');
    return c.section ? `${title} › ${c.section}` : title;
  }

  function sourceLink(c, content, attrs = {}) {
    const href = safeHref(c.url);
    if (!href) return h('span', attrs, content);
    return h('a', { href, target: '_blank', rel: 'noopener', ...attrs }, content);
  }

  /** The answer as text, with `[n]` (or `[n, m]`) markers that match a citation turned into links. */
  function renderAnswer(container, text, citations) {
    const byIndex = new Map(citations.map((c) => [Number(c.index), c]));
    container.textContent = '';
    let last = 0;
    for (const m of text.matchAll(/\[(\d+(?:\s*,\s*\d+)*)\]/g)) {
      const numbers = m[1].split(',').map((s) => Number(s.trim()));
      if (!numbers.every((n) => byIndex.has(n))) continue; // unknown markers stay as typed
      container.append(text.slice(last, m.index));
      for (const n of numbers) {
        const c = byIndex.get(n);
        container.append(sourceLink(c, `[${n}]`, { class: 'cite', 'aria-label': `Source ${n}: ${citationLabel(c)}` }));
      }
      last = m.index + m[0].length;
    }
    container.append(text.slice(last));
  }

  function sourcesList(citations) {
    const list = h('ol');
    for (const c of citations) {
      const link = sourceLink(c, citationLabel(c), { 'data-testid': 'citation' });
      if (link.tagName === 'A') link.append(h('span', { class: 'visually-hidden' }, ' (opens in a new tab)'));
      list.append(h('li', { value: String(c.index) }, link));
    }
    return h('div', { class: 'sources' }, h('p', { class: 'label' }, 'Sources'), list);
  }

  function refusalNote(handoff) {
    const message = (handoff && handoff.message) || byId('handoff-panel').querySelector('[data-testid="handoff-message"]').textContent;
    return h(
      'div',
      { class: 'refusal-note', 'data-testid': 'refusal' },
      h('strong', {}, 'Our help center does not cover this.'),
      h('p', {}, message),
      h('button', { type: 'button', class: 'secondary', onclick: openHandoff }, 'Talk to a human'),
    );
  }

  // ---- the conversation

  function ask(raw) {
    const text = raw.trim();
    if (active || !text) {
      input.focus();
      return;
    }
    // Only the latest failed question can be retried: a retry after newer turns would reorder them.
    for (const b of log.querySelectorAll('[data-testid="retry"]')) b.remove();
    awaitingKey = null;
    addUserMessage(text);
    input.value = '';
    run({ text, bot: addAssistantMessage(), partial: '' });
  }

  function retry(turn) {
    if (active) return;
    if (input.value.trim() === turn.text) input.value = '';
    run(turn);
  }

  /** Answers `turn`, waiting once on a 429/503's Retry-After before giving up. */
  async function run(turn) {
    const controller = new AbortController();
    active = { turn, controller };
    setBusy(true);
    let autoRetried = false;
    try {
      for (;;) {
        resetAnswer(turn.bot);
        const busy = await attempt(turn, controller.signal);
        if (!busy) return;
        if (autoRetried) {
          fail(turn, `${busy.message} Please try again in a moment.`, { retry: true });
          return;
        }
        autoRetried = true;
        turn.bot.node.dataset.state = 'waiting';
        note(turn.bot, `${busy.message} Trying again in ${busy.seconds} s…`, 'busy');
        typing.hidden = true;
        await sleep(busy.seconds, controller.signal);
        typing.hidden = false;
      }
    } catch (err) {
      if (err.name === 'AbortError') stopped(turn);
      else if (err instanceof StreamError) fail(turn, `Sorry, the answer was interrupted: ${err.message}.`, { retry: true });
      else if (turn.connected) fail(turn, 'The connection to the server was lost before the answer finished.', { retry: true });
      else fail(turn, 'Could not reach the support server. Check your connection and try again.', { retry: true });
    } finally {
      active = null;
      setBusy(false);
    }
  }

  /**
   * One request. Renders the answer or the failure; returns {seconds, message} when the server
   * is busy or still starting (429 / 503), so the caller can wait and retry.
   */
  async function attempt(turn, signal) {
    turn.partial = '';
    turn.connected = false;
    const headers = authHeaders({ 'Content-Type': 'application/json', Accept: 'text/event-stream' });
    const messages = [...history, { role: 'user', content: turn.text }];
    // Support answers should be reproducible and stay close to the passages: greedy decoding (the
    // API's default temperature of 1 lets small models wander off the documentation), with a
    // frequency penalty so greedy text does not loop on one line.
    const request = { messages, stream: true, temperature: 0, frequency_penalty: 0.5 };
    if (conversationId) request.helpline = { conversation_id: conversationId };
    const resp = await fetch('/v1/chat/completions', { method: 'POST', headers, body: JSON.stringify(request), signal });
    turn.connected = true;
    if (!resp.ok) return httpFailure(turn, resp);
    const started = resp.headers.get('X-Helpline-Conversation-Id');
    if (started && !turn.discarded) conversationId = started;

    let finish = null;
    for await (const data of sseData(resp.body)) {
      if (data === '[DONE]') break;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        throw new StreamError('the server sent a reply this page cannot read');
      }
      if (chunk.error) throw new StreamError(chunk.error.message || 'the server failed to finish this answer');
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        turn.partial += piece;
        keepingScroll(() => turn.bot.text.append(piece));
      }
      if (choice.finish_reason) finish = { reason: choice.finish_reason, helpline: chunk.helpline || {} };
    }
    if (!finish) throw new StreamError('the reply ended before the answer was complete');
    complete(turn, finish);
    return null;
  }

  /** The `data:` payloads of a server-sent-event body; comment lines (keep-alives) are skipped. */
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer = (buffer + value).replace(/\r\n/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = [];
          for (const line of block.split('\n')) {
            if (line.startsWith('data:')) data.push(line.slice(line.startsWith('data: ') ? 6 : 5));
          }
          if (data.length) yield data.join('\n');
        }
      }
    } finally {
      reader.cancel().catch(() => {}); // closes the connection when we stop early
    }
  }

  async function httpFailure(turn, resp) {
    const body = await resp.json().catch(() => null);
    const message = (body && body.error && body.error.message) || `${resp.status} ${resp.statusText}`.trim();
    switch (resp.status) {
      case 401: {
        const hadKey = sessionStorage.getItem(KEY_STORAGE) !== null;
        sessionStorage.removeItem(KEY_STORAGE);
        const why = hadKey ? 'That API key was not accepted' : 'This assistant needs an API key';
        fail(turn, `${why} (${message}). Enter it below.`, { retry: false });
        awaitingKey = turn;
        keyForm.hidden = false;
        keyInput.focus();
        return null;
      }
      case 429:
        return { seconds: retryAfter(resp), message: 'We are busy answering other customers right now.' };
      case 503:
        return { seconds: retryAfter(resp), message: 'The assistant is still starting up.' };
      default:
        if (resp.status >= 500) fail(turn, `Something went wrong on our side (${resp.status}): ${message}`, { retry: true });
        // Other 4xx: sending the same question again would fail the same way; it is back in the box to edit.
        else fail(turn, `The server could not take this question (${resp.status}): ${message}`, { retry: false });
        return null;
    }
  }

  /** Retry-After in whole seconds (delta or HTTP date), 2 when absent, capped for the auto-retry. */
  function retryAfter(resp) {
    const value = resp.headers.get('Retry-After');
    if (!value) return 2;
    let seconds = Number(value);
    if (!Number.isFinite(seconds)) seconds = (Date.parse(value) - Date.now()) / 1000;
    if (!Number.isFinite(seconds)) return 2;
    return Math.min(Math.max(Math.ceil(seconds), 1), MAX_AUTO_WAIT_S);
  }

  function sleep(seconds, signal) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, seconds * 1000);
      signal.addEventListener('abort', () => {
        clearTimeout(timer);
        reject(new DOMException('stopped', 'AbortError'));
      }, { once: true });
    });
  }

  function complete(turn, finish) {
    const { bot, partial: answer } = turn;
    const hl = finish.helpline;
    const citations = Array.isArray(hl.citations) ? hl.citations : [];
    const status = (hl.grounding && hl.grounding.status) || '';
    keepingScroll(() => {
      renderAnswer(bot.text, answer, citations);
      if (citations.length) bot.node.append(sourcesList(citations));
      // A refusal: the docs do not cover it, the policy refused the topic, or a person takes over.
      if (status === 'no_relevant_docs' || finish.reason === 'content_filter' || (hl.handoff && hl.handoff.offered)) {
        bot.node.classList.add('refusal');
        bot.node.append(refusalNote(hl.handoff));
      }
      if (finish.reason === 'length') bot.node.append(h('p', { class: 'note' }, 'This answer was cut short by the length limit.'));
    });
    bot.node.dataset.grounding = status;
    settle(bot, 'done');
    history.push({ role: 'user', content: turn.text }, { role: 'assistant', content: answer });
  }

  function stopped(turn) {
    if (turn.discarded) return; // "New chat" threw this turn away
    settle(turn.bot, 'stopped');
    note(turn.bot, 'Stopped.');
    if (turn.partial) {
      // What was shown stays part of the conversation, so the next question has its context.
      history.push({ role: 'user', content: turn.text }, { role: 'assistant', content: turn.partial });
    } else if (!input.value.trim()) {
      input.value = turn.text;
    }
  }

  /** Shows a failure in the conversation; the question goes back in the box unless something new is typed there. */
  function fail(turn, message, { retry: canRetry }) {
    const box = h('div', { class: 'error', 'data-testid': 'error' }, h('p', {}, message));
    if (canRetry) {
      box.append(h('p', {}, h('button', { type: 'button', class: 'secondary', 'data-testid': 'retry', onclick: () => retry(turn) }, 'Try again')));
    }
    for (const old of turn.bot.node.querySelectorAll('.note[data-testid="busy"]')) old.remove();
    keepingScroll(() => turn.bot.node.append(box));
    settle(turn.bot, 'error');
    if (!input.value.trim()) input.value = turn.text;
  }

  function setBusy(busy) {
    const focusWasOnControls = [sendBtn, stopBtn, document.body].includes(document.activeElement);
    sendBtn.disabled = busy;
    stopBtn.hidden = !busy;
    typing.hidden = !busy;
    // A button that disappears or is disabled drops focus; put it somewhere useful instead.
    if (focusWasOnControls && keyForm.hidden) (busy ? stopBtn : input).focus();
  }

  // ---- handoff

  /** "Talk to a human": hands this conversation to a person (the handoff route), then shows what
   * happens next. Before the first question there is no conversation to hand over yet. */
  async function openHandoff() {
    const status = byId('handoff-status');
    status.textContent = '';
    handoffPanel.hidden = false;
    humanBtn.setAttribute('aria-expanded', 'true');
    handoffPanel.focus();
    if (!conversationId) {
      status.textContent = 'Ask your question first, and we will pass the whole conversation to a person.';
      return;
    }
    humanBtn.disabled = true;
    try {
      const resp = await fetch(`/v1/conversations/${encodeURIComponent(conversationId)}/handoff`, {
        method: 'POST',
        headers: authHeaders({ 'Content-Type': 'application/json' }),
        body: JSON.stringify({ reason: 'customer_request' }),
      });
      if (resp.ok) {
        const out = await resp.json();
        status.textContent = out.message || 'A member of our support team will take it from here.';
        handoffPanel.dataset.state = 'handed_off';
      } else {
        let message = `The request failed (${resp.status}).`;
        try {
          const err = await resp.json();
          if (err.error && err.error.message) message = err.error.message;
        } catch {}
        status.textContent = `Could not reach a person: ${message}`;
        handoffPanel.dataset.state = 'error';
      }
    } catch {
      status.textContent = 'Could not reach the support server. Check your connection and try again.';
      handoffPanel.dataset.state = 'error';
    } finally {
      humanBtn.disabled = false;
    }
  }

  function closeHandoff() {
    handoffPanel.hidden = true;
    humanBtn.setAttribute('aria-expanded', 'false');
    humanBtn.focus();
  }

  // ---- wiring

  composer.addEventListener('submit', (e) => {
    e.preventDefault();
    ask(input.value);
  });

  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      composer.requestSubmit();
    } else if (e.key === 'Escape' && active) {
      active.controller.abort();
    }
  });

  stopBtn.addEventListener('click', () => active && active.controller.abort());

  keyForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const key = keyInput.value.trim();
    if (!key) return keyInput.focus();
    sessionStorage.setItem(KEY_STORAGE, key);
    keyInput.value = '';
    keyForm.hidden = true;
    const pending = awaitingKey;
    awaitingKey = null;
    input.focus();
    if (pending && !active) retry(pending);
  });

  humanBtn.addEventListener('click', openHandoff);
  byId('handoff-close').addEventListener('click', closeHandoff);

  newChatBtn.addEventListener('click', () => {
    if (active) {
      active.turn.discarded = true;
      active.controller.abort();
    }
    history = [];
    conversationId = null;
    awaitingKey = null;
    log.replaceChildren(greeting);
    input.focus();
  });
})();
