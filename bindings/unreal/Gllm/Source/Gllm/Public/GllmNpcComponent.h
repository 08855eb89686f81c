// One NPC's dialogue: its persona and chat history (a gllm::NpcConversation), sent through the game instance's
// UGllmSubsystem. Say() from Blueprint; the reply streams into OnText and ends with OnCompleted or OnFailed.
#pragma once

#include "Components/ActorComponent.h"
#include "CoreMinimal.h"

THIRD_PARTY_INCLUDES_START
#include "gllm/client.h"
THIRD_PARTY_INCLUDES_END

#include <memory>

#include "GllmNpcComponent.generated.h"

DECLARE_DYNAMIC_MULTICAST_DELEGATE_TwoParams(FGllmNpcText, const FString&, Delta, const FString&, FullSoFar);
DECLARE_DYNAMIC_MULTICAST_DELEGATE_TwoParams(FGllmNpcCompleted, const FString&, Text, const FString&, FinishReason);
DECLARE_DYNAMIC_MULTICAST_DELEGATE_TwoParams(FGllmNpcFailed, const FString&, Code, const FString&, Message);

UCLASS(ClassGroup = (AI), meta = (BlueprintSpawnableComponent))
class GLLM_API UGllmNpcComponent : public UActorComponent
{
	GENERATED_BODY()

public:
	UGllmNpcComponent();

	/** The persona, sent first with every request (never trimmed). */
	UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "gllm", meta = (MultiLine = true))
	FString SystemPrompt = TEXT("You are a town guard. Answer in one short sentence.");

	UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "gllm")
	int32 MaxTokens = 96;

	UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "gllm")
	float Temperature = 0.7f;

	/** Higher is scheduled first (the NPC facing the player). */
	UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "gllm")
	int32 Priority = 0;

	/** Pace the reply to at most this many tokens a second (15-40: about as fast as it is shown or spoken), leaving
	 *  the compute to other NPCs; 0: as fast as possible. Up to 1000. */
	UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "gllm", meta = (ClampMin = "0", ClampMax = "1000"))
	float MaxTokensPerS = 0.0f;

	/** The first token is wanted within this many milliseconds of Say (among equal Priority the earliest deadline
	 *  is served first); 0: no deadline. LastReplyMetDeadline says whether it was met. */
	UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "gllm", meta = (ClampMin = "0", ClampMax = "3600000"))
	float TtftDeadlineMs = 0.0f;

	/** After OnCompleted: whether the reply had a TtftDeadlineMs (the server reported on it) ... */
	UPROPERTY(BlueprintReadOnly, Category = "gllm")
	bool bLastReplyHadDeadline = false;

	/** ... and whether its first token came within it. */
	UPROPERTY(BlueprintReadOnly, Category = "gllm")
	bool bLastReplyMetDeadline = false;

	/** After OnCompleted: milliseconds from the request to its first token in the server (-1: no token). */
	UPROPERTY(BlueprintReadOnly, Category = "gllm")
	float LastReplyTtftMs = -1.0f;

	UPROPERTY(BlueprintAssignable, Category = "gllm")
	FGllmNpcText OnText;

	UPROPERTY(BlueprintAssignable, Category = "gllm")
	FGllmNpcCompleted OnCompleted;

	UPROPERTY(BlueprintAssignable, Category = "gllm")
	FGllmNpcFailed OnFailed;

	/** The player says a line; the NPC's reply streams into OnText. A reply still running is cancelled. */
	UFUNCTION(BlueprintCallable, Category = "gllm")
	FString Say(const FString& Line);

	UFUNCTION(BlueprintCallable, Category = "gllm")
	void Cancel();

	UFUNCTION(BlueprintPure, Category = "gllm")
	bool IsReplying() const { return Conversation && !Conversation->active_request_id().empty(); }

	/** The persona and history as JSON, for the save game; LoadFromJson restores them. */
	UFUNCTION(BlueprintCallable, Category = "gllm")
	FString SaveToJson() const;

	UFUNCTION(BlueprintCallable, Category = "gllm")
	bool LoadFromJson(const FString& Json);

	virtual void BeginPlay() override;
	virtual void EndPlay(const EEndPlayReason::Type Reason) override;

private:
	void Bind();
	std::unique_ptr<gllm::NpcConversation> Conversation;
	FString LastDelta;
};
